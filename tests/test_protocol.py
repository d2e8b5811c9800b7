"""One request protocol, the same behaviour on every served path: one table of cases, run on the
five adapters (FastAPI, Starlette, Flask, Django WSGI, Django ASGI) mounted under /v1 (a prefix
the app does not know: Starlette's Mount, werkzeug's dispatcher, waitress's url_prefix) with an
authentication middleware inside ours; and a request is traced once however often the middleware
is applied."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

import apps
from conftest import ADAPTERS, UvicornThread, WaitressThread, find_traces, get_trace
from test_feedback import TOKEN, assessments

PREFIX = "/v1"
# Paths are rules on the path the client sent, mount prefix included, under every adapter.
OPTIONS = {"exclude_paths": [f"{PREFIX}/health"], "feedback_path": f"{PREFIX}/mlflow/feedback"}
ROUTES = {
    "fastapi": "GET /items/{item_id}",
    "starlette": "GET /items/{item_id:int}",
    "flask": "GET /items/<int:item_id>",
    "django-wsgi": "GET /items/<int:item_id>",
    "django-asgi": "GET /items/<int:item_id>",
}


@contextmanager
def mounted(adapter: str) -> Iterator[str]:
    """The test app with an auth middleware inside ours, mounted at PREFIX; yields the base URL."""
    if adapter in ("fastapi", "starlette"):
        from starlette.applications import Starlette
        from starlette.routing import Mount

        factory = apps.fastapi_app if adapter == "fastapi" else apps.starlette_app
        parent = Starlette(routes=[Mount(PREFIX, app=factory(auth_inside=True, **OPTIONS))])
        with UvicornThread(parent) as url:
            yield url
    elif adapter == "flask":
        from werkzeug.exceptions import NotFound
        from werkzeug.middleware.dispatcher import DispatcherMiddleware

        with WaitressThread(
            DispatcherMiddleware(NotFound(), {PREFIX: apps.flask_app(auth_inside=True, **OPTIONS)})
        ) as url:
            yield url
    else:
        import django
        from django.test.utils import override_settings

        django.setup(set_prefix=False)
        from django.conf import settings

        inside = ["django.middleware.common.CommonMiddleware", "mlflow_ctx_mw.django.MlflowContextMiddleware",
                  "djproj.auth.BearerAuthMiddleware"]  # fmt: skip
        with override_settings(
            MIDDLEWARE=inside, MLFLOW_CTX={**settings.MLFLOW_CTX, **OPTIONS, "trust_user_header": None}
        ):
            if adapter == "django-wsgi":
                from django.core.wsgi import get_wsgi_application

                server: Any = WaitressThread(get_wsgi_application(), url_prefix=PREFIX)
            else:
                from django.core.asgi import get_asgi_application
                from starlette.applications import Starlette
                from starlette.routing import Mount

                server = UvicornThread(Starlette(routes=[Mount(PREFIX, app=get_asgi_application())]))
        with server as url:
            yield url


@pytest.fixture(scope="module", params=ADAPTERS)
def served_mounted(request: pytest.FixtureRequest, mlflow_server: str) -> Iterator[tuple[str, str]]:
    with mounted(request.param) as url:
        yield request.param, url + PREFIX


def tag() -> str:
    return uuid.uuid4().hex[:10]


def case_traced_with_the_template_and_the_full_path(adapter: str, url: str) -> None:
    request_id = f"req-{tag()}"
    response = httpx.get(url + "/items/7", headers={"X-Request-ID": request_id})
    assert response.status_code == 200 and response.json() == {"value": 14}
    [found] = find_traces(f"attributes.client_request_id = '{request_id}'")
    assert found.info.trace_id == response.headers["X-Trace-ID"]
    root = next(s for s in get_trace(found.info.trace_id).data.spans if s.parent_id is None)
    assert root.name == ROUTES[adapter]  # the template, relative to the app
    assert root.attributes["url.path"] == f"{PREFIX}/items/7"  # the path the client sent


def case_excluded_by_the_full_path(adapter: str, url: str) -> None:
    response = httpx.get(url + "/health")
    assert response.status_code == 404  # the app's own answer
    assert "X-Trace-ID" not in response.headers and "X-Request-ID" not in response.headers


def case_the_authenticated_user_wins(adapter: str, url: str) -> None:
    """The authentication middleware runs inside ours: its user is learnt as the response starts."""
    name = f"auth-{tag()}"
    response = httpx.get(
        url + "/items/1", headers={"Authorization": f"Bearer {name}", "X-User-ID": "spoofed"}
    )
    assert get_trace(response.headers["X-Trace-ID"]).info.trace_metadata.get("mlflow.trace.user") == name


def case_an_unauthenticated_header_names_nobody(adapter: str, url: str) -> None:
    response = httpx.get(url + "/items/1", headers={"X-User-ID": "spoofed"})
    assert "mlflow.trace.user" not in get_trace(response.headers["X-Trace-ID"]).info.trace_metadata


def case_feedback_at_the_mounted_path(adapter: str, url: str) -> None:
    name = f"rater-{tag()}"
    response = httpx.get(url + "/items/2", headers={"Authorization": f"Bearer {name}"})
    body = {"trace_id": response.headers["X-Trace-ID"], "value": True}
    rated = httpx.post(url + "/mlflow/feedback", json=body, headers={TOKEN: response.headers[TOKEN]})
    assert rated.status_code == 202, rated.text
    [rating] = assessments(response.headers["X-Trace-ID"], 1)
    assert rating.source.source_id == name


CASES: list[Callable[[str, str], None]] = [
    case_traced_with_the_template_and_the_full_path,
    case_excluded_by_the_full_path,
    case_the_authenticated_user_wins,
    case_an_unauthenticated_header_names_nobody,
    case_feedback_at_the_mounted_path,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_every_behaviour_on_every_served_path(
    served_mounted: tuple[str, str], case: Callable[[str, str], None]
) -> None:
    case(*served_mounted)


# --- applied twice, traced once ---------------------------------------------------------------------


def twice_asgi() -> Any:
    from mlflow_ctx_mw.asgi import MlflowContextMiddleware

    return MlflowContextMiddleware(apps.starlette_app())  # the app wraps itself once already


def django_inside_asgi() -> Any:
    from django.core.asgi import get_asgi_application

    from mlflow_ctx_mw.asgi import MlflowContextMiddleware

    return MlflowContextMiddleware(get_asgi_application())


def twice_wsgi() -> Any:
    from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

    return MlflowContextMiddleware(apps.flask_app())


@pytest.mark.parametrize("factory", [twice_asgi, django_inside_asgi, twice_wsgi])
def test_applied_twice_traced_once(factory: Callable[[], Any], mlflow_server: str) -> None:
    server = WaitressThread if factory is twice_wsgi else UvicornThread
    request_id = f"twice-{tag()}"
    with server(factory()) as url:
        response = httpx.get(url + "/items/3", headers={"X-Request-ID": request_id})
    assert response.status_code == 200
    assert len(response.headers.get_list("X-Trace-ID")) == 1
    [found] = find_traces(f"attributes.client_request_id = '{request_id}'", expected=2, timeout=5)
    assert found.info.trace_id == response.headers["X-Trace-ID"]
    roots = [s for s in get_trace(found.info.trace_id).data.spans if s.parent_id is None]
    assert len(roots) == 1
