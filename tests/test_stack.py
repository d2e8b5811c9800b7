"""Fitting the rest of the stack: authenticated users, distributed traces, log correlation and
context access, under the adapters and against the real MLflow server."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import httpx
import mlflow
import pytest

from conftest import UvicornThread, WaitressThread, find_traces, get_trace
from mlflow_ctx_mw import TraceContextFilter, _mlflow, current_request, outgoing_headers
from test_feedback import assessments

# --- the user from the app's own auth ------------------------------------------------------------


def starlette_with_auth(**options: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from mlflow_ctx_mw.asgi import MlflowContextMiddleware

    class Bearer(AuthenticationBackend):
        async def authenticate(self, conn: Any) -> Any:
            value = conn.headers.get("Authorization", "")
            if value.startswith("Bearer "):
                return AuthCredentials(["authenticated"]), SimpleUser(value[7:])
            return None

    async def hello(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[Route("/hello", hello)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=Bearer()),  # outside ours: scope["user"] is set
            Middleware(MlflowContextMiddleware, **options),
        ],
    )


def flask_with_login(**options: Any) -> Any:
    from flask import Flask

    from apps import bearer_login
    from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

    app = Flask(__name__)
    bearer_login(app)

    @app.get("/hello")
    def hello() -> dict[str, bool]:
        from flask_login import current_user

        return {"ok": bool(current_user.is_authenticated)}

    app.wsgi_app = MlflowContextMiddleware(app.wsgi_app, **options)  # type: ignore[method-assign]
    return app


def user_of(response: httpx.Response) -> str | None:
    return get_trace(response.headers["X-Trace-ID"]).info.trace_metadata.get("mlflow.trace.user")


@pytest.mark.parametrize("kind", ["starlette", "flask"])
def test_authenticated_user_wins_over_the_header(kind: str, mlflow_server: str) -> None:
    name = f"auth-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {name}", "X-User-ID": "spoofed"}
    app, server = (
        (starlette_with_auth(), UvicornThread)
        if kind == "starlette"
        else (flask_with_login(), WaitressThread)
    )
    with server(app) as url:
        response = httpx.get(url + "/hello", headers=headers)
    assert response.status_code == 200
    # Flask-Login resolves the user inside the app: the trace learns it as the response starts.
    assert user_of(response) == name


@pytest.mark.parametrize("served", ["django-wsgi", "django-asgi"], indirect=True)
def test_django_request_user_wins_over_the_header(served: tuple[str, str]) -> None:
    _, url = served
    name = f"auth-{uuid.uuid4().hex[:8]}"
    response = httpx.get(
        url + "/items/1", headers={"Authorization": f"Bearer {name}", "X-User-ID": "spoofed"}
    )
    assert response.status_code == 200 and user_of(response) == name


@pytest.mark.parametrize("trusted", [True, False, None])
def test_header_trust_policy_without_an_authenticated_user(trusted: bool | None, mlflow_server: str) -> None:
    """None (the default): the app authenticates, so an unauthenticated header names nobody."""
    with UvicornThread(starlette_with_auth(trust_user_header=trusted)) as url:
        response = httpx.get(url + "/hello", headers={"X-User-ID": "from-header"})
    assert user_of(response) == ("from-header" if trusted else None)


def test_custom_user_resolver_also_names_the_feedback_source(mlflow_server: str) -> None:
    resolver = lambda request: request.headers.get("x-employee")  # noqa: E731
    with UvicornThread(starlette_with_auth(user_resolver=resolver)) as url:
        response = httpx.get(url + "/hello", headers={"X-Employee": "emp-7"})
        assert user_of(response) == "emp-7"
        rated = httpx.post(
            url + "/mlflow/feedback",
            json={"trace_id": response.headers["X-Trace-ID"], "value": True},
            headers={"X-Employee": "emp-7", "X-Feedback-Token": response.headers["X-Feedback-Token"]},
            timeout=30,
        )
    assert rated.status_code == 202
    [assessment] = assessments(response.headers["X-Trace-ID"], 1)
    assert assessment.source.source_id == "emp-7"


# --- distributed traces: two real services ----------------------------------------------------


def downstream(**options: Any) -> Any:
    from flask import Flask

    from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

    app = Flask("downstream")

    @app.get("/work")
    def work() -> dict[str, Any]:
        info = current_request()
        return {"request_id": info.client_request_id if info else None}

    app.wsgi_app = MlflowContextMiddleware(app.wsgi_app, **options)  # type: ignore[method-assign]
    return app


def gateway(downstream_url: str) -> Any:
    from fastapi import FastAPI

    from mlflow_ctx_mw.asgi import MlflowContextMiddleware

    app = FastAPI()

    @app.get("/ask")
    def ask() -> dict[str, Any]:
        return httpx.get(downstream_url + "/work", headers=outgoing_headers()).json()

    app.add_middleware(MlflowContextMiddleware)
    return app


@pytest.mark.parametrize("accept", [True, False, ["127.0.0.0/8"], ["10.0.0.0/8"]])
def test_a_trace_is_followed_into_the_next_service(accept: bool | list[str], mlflow_server: str) -> None:
    """A caller's traceparent is followed only when the app trusts it (all, or these peers)."""
    ids = {"X-Request-ID": f"dist-{uuid.uuid4().hex[:8]}", "X-User-ID": "u-dist", "X-Session-ID": "s-dist"}
    with (
        WaitressThread(downstream(accept_traceparent=accept)) as b_url,
        UvicornThread(gateway(b_url)) as a_url,
    ):
        response = httpx.get(a_url + "/ask", headers=ids)
    assert response.json() == {"request_id": ids["X-Request-ID"]}  # the request id travelled on
    caller = response.headers["X-Trace-ID"]
    traces = find_traces(f"attributes.client_request_id = '{ids['X-Request-ID']}'", expected=2)
    [callee] = [t for t in traces if t.info.trace_id != caller]
    meta = callee.info.trace_metadata
    assert (meta["mlflow.trace.user"], meta["mlflow.trace.session"]) == ("u-dist", "s-dist")
    root = next(s for s in get_trace(callee.info.trace_id).data.spans if s.parent_id is None)
    if accept is True or accept == ["127.0.0.0/8"]:  # the gateway calls from 127.0.0.1
        assert meta["mlflow_ctx.caller_trace_id"] == caller
        found = find_traces(f"metadata.`mlflow_ctx.caller_trace_id` = '{caller}'")
        assert [t.info.trace_id for t in found] == [callee.info.trace_id]
        caller_root = next(s for s in get_trace(caller).data.spans if s.parent_id is None)
        links = [(caller, caller_root.span_id)] if _mlflow.SUPPORTS_LINKS else []  # links: 3.15+
        assert [(link.trace_id, link.span_id) for link in root.links or []] == links
    else:
        assert "mlflow_ctx.caller_trace_id" not in meta and not root.links


def test_malformed_traceparent_is_ignored(mlflow_server: str) -> None:
    with WaitressThread(downstream(accept_traceparent=True)) as url:
        response = httpx.get(url + "/work", headers={"traceparent": "00-xyz-123-01", "X-User-ID": "tp"})
    assert response.status_code == 200
    assert "mlflow_ctx.caller_trace_id" not in get_trace(response.headers["X-Trace-ID"]).info.trace_metadata


# --- log correlation and context access ----------------------------------------------------------


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:  # logging holds the handler's lock here
        self.records.append(record)


@pytest.mark.parametrize("path", ["/items/{i}", "/sync-items/{i}"])
def test_log_records_carry_the_requests_ids(served: tuple[str, str], path: str) -> None:
    _, url = served
    capture = Capture()
    capture.addFilter(TraceContextFilter())
    logger = logging.getLogger("tests.apps")
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        item = uuid.uuid4().int % 10_000
        ids = {"X-Request-ID": f"log-{item}", "X-User-ID": f"u-{item}", "X-Session-ID": f"s-{item}"}
        response = httpx.get(url + path.format(i=item), headers=ids)
    finally:
        logger.removeHandler(capture)
    [record] = [r for r in capture.records if r.getMessage() == f"looked up {item}"]
    assert record.trace_id == response.headers["X-Trace-ID"]  # type: ignore[attr-defined]
    assert (record.client_request_id, record.user_id, record.session_id) == (  # type: ignore[attr-defined]
        ids["X-Request-ID"], ids["X-User-ID"], ids["X-Session-ID"],
    )  # fmt: skip


def test_outside_a_request_there_is_no_context() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    TraceContextFilter().filter(record)
    assert (record.trace_id, record.user_id) == ("-", "-")  # type: ignore[attr-defined]
    assert current_request() is None and outgoing_headers() == {}
    assert mlflow.get_current_active_span() is None
