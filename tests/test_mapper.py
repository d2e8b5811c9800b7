"""The framework-free core: headers and environment -> trace context."""

from __future__ import annotations

import re

import pytest

from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.mapper import (
    MAX_ID_LENGTH,
    MAX_METADATA_LENGTH,
    RequestView,
    build_context,
    clean_id,
    clean_text,
)


def view(**headers: str) -> RequestView:
    return RequestView("GET", "/x", "", {k.lower().replace("_", "-"): v for k, v in headers.items()})


def test_standard_headers() -> None:
    ctx = build_context(Options(), view(X_Request_ID="r-1", X_Session_ID="s-1", X_User_ID="u-1"))
    assert ctx.request_id == "r-1" and not ctx.request_id_generated
    assert ctx.metadata["mlflow.trace.session"] == "s-1"
    assert ctx.metadata["mlflow.trace.user"] == "u-1"


def test_absent_fields_are_not_invented(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("APP_ENVIRONMENT", "APP_VERSION", "DEPLOYMENT_ID", "REGION"):
        monkeypatch.delenv(var, raising=False)
    ctx = build_context(Options(), view())
    assert ctx.metadata == {} and ctx.tags == {}
    assert ctx.request_id_generated and re.fullmatch(r"[0-9a-f]{32}", ctx.request_id)


def test_custom_header_names_and_maps() -> None:
    options = Options(
        user_id_header="X-Auth-User",
        header_metadata={"X-Client-Version": "client_version"},
        header_tags={"X-Tenant": "tenant"},
        static_metadata={"team": "search"},
        static_tags={"service": "chat"},
    )
    ctx = build_context(options, view(X_Auth_User="alice", X_Client_Version="ios-3", X_Tenant="acme"))
    assert ctx.metadata == {"mlflow.trace.user": "alice", "client_version": "ios-3", "team": "search"} | {
        k: v for k, v in options.env_values.items()
    }
    assert ctx.tags == {"tenant": "acme", "service": "chat"}


def test_request_hook_adds_fields_and_its_failure_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    def hook(request: RequestView) -> dict[str, dict[str, str]]:
        return {"metadata": {"route_kind": request.method.lower()}, "tags": {"flag": "on"}}

    ctx = build_context(Options(request_hook=hook), view())
    assert ctx.metadata["route_kind"] == "get" and ctx.tags["flag"] == "on"

    def broken(request: RequestView) -> None:
        raise RuntimeError("hook bug")

    for _ in range(3):
        ctx = build_context(Options(request_hook=broken), view(X_User_ID="u"))
        assert ctx.metadata["mlflow.trace.user"] == "u"
    assert sum("request_hook failed" in r.message for r in caplog.records) <= 1


def test_standard_fields_win_over_hook() -> None:
    ctx = build_context(
        Options(request_hook=lambda r: {"metadata": {"mlflow.trace.user": "spoofed"}}), view(X_User_ID="real")
    )
    assert ctx.metadata["mlflow.trace.user"] == "real"


@pytest.mark.parametrize(
    "value",
    [
        *("", "   ", "a b", "x" * (MAX_ID_LENGTH + 1), "id\r\nX-Injected: 1"),
        *("caf\u00e9", "\udcff", "id\x00"),
        *("a'b", 'a"b', "a`b", "a\\b"),  # MLflow filter strings have no escapes: never recorded
    ],
)
def test_unusable_request_ids_are_replaced(value: str) -> None:
    ctx = build_context(Options(), view(X_Request_ID=value))
    assert ctx.request_id_generated and ctx.request_id != value


@pytest.mark.parametrize(
    "value",
    [
        "0af7651916cd43dd8448eb211c80319c",
        "req-1/2:3",
        "x" * MAX_ID_LENGTH,
        "Root=1-5f8;Parent=53995c3f",
        "01HV~x",
    ],
)
def test_printable_ids_in_many_formats_are_kept(value: str) -> None:
    assert build_context(Options(), view(X_Request_ID=value)).request_id == value


def test_hostile_user_and_session_are_dropped() -> None:
    ctx = build_context(Options(), view(X_User_ID="u\nX: y", X_Session_ID="s" * (MAX_METADATA_LENGTH + 1)))
    assert "mlflow.trace.user" not in ctx.metadata and "mlflow.trace.session" not in ctx.metadata


def test_clean_text() -> None:
    assert clean_text("a\x00b\r\nc\x7f", 100) == "a b c"
    assert clean_text("\udcffok", 100) == "?ok"
    assert clean_text("x" * 10, 4) == "xxxx"
    assert clean_text("\x00\x01", 10) is None
    assert clean_text(None, 10) is None


def test_clean_id() -> None:
    assert clean_id(" abc ", 10) == "abc"
    assert clean_id("abc", 2) is None
    assert clean_id(None, 2) is None


def test_asgi_headers_are_lower_cased_and_repeats_joined() -> None:
    """A repeated id header is ambiguous: joined as HTTP says, it is then no valid id at all."""
    from mlflow_ctx_mw._asgi import view as _view

    raw = [(b"X-User-ID", b"alice"), (b"x-session-id", b"s-1"), (b"x-user-id", b"mallory")]
    asgi_view = _view({"type": "http", "method": "GET", "path": "/", "headers": raw})
    assert asgi_view.headers == {"x-user-id": "alice, mallory", "x-session-id": "s-1"}
    ctx = build_context(Options(), asgi_view)
    assert ctx.user_id is None and ctx.session_id == "s-1"
    single = _view({"type": "http", "headers": iter([(b"X-User-ID", b"alice")])})  # any iterable
    assert build_context(Options(), single).user_id == "alice"


def test_a_user_object_that_leaves_attributes_unimplemented_is_still_named() -> None:
    """Starlette's BaseUser raises NotImplementedError for `identity` where a subclass (its own
    SimpleUser before 1.x) does not define it: the next attribute names the user."""
    from starlette.authentication import BaseUser

    from mlflow_ctx_mw.users import name_of

    class OnlyDisplayName(BaseUser):
        @property
        def is_authenticated(self) -> bool:
            return True

        @property
        def display_name(self) -> str:
            return "ada"

    assert name_of(OnlyDisplayName()) == "ada"


def test_route_template_found_without_scope_route_under_a_mount() -> None:
    """Starlette < 1.8 leaves the route out of the scope, and its "router" is the outermost one:
    the template is asked of the router under the middleware, relative to where it is mounted."""
    from starlette.applications import Starlette
    from starlette.middleware.exceptions import ExceptionMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from mlflow_ctx_mw import _asgi

    def endpoint(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/items/{item_id:int}", endpoint)])
    outer = Starlette(routes=[Mount("/v1", app=inner)])
    scope = {"type": "http", "method": "GET", "path": "/v1/items/7", "root_path": "/v1",
             "endpoint": endpoint, "router": outer.router}  # fmt: skip
    below = _asgi.router_below(ExceptionMiddleware(inner.router))  # as add_middleware wraps it
    assert below is inner.router
    assert _asgi.route(scope, "/v1", below) == "/items/{item_id:int}"
