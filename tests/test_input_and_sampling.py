"""Hostile header values (Hypothesis) through the ASGI and WSGI adapters, and sampling."""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import mlflow
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_ctx_mw import Options, asgi, wsgi
from mlflow_ctx_mw.mapper import (
    MAX_ID_LENGTH,
    MAX_METADATA_LENGTH,
    MAX_TAG_LENGTH,
    RequestView,
    build_context,
)

pytestmark = pytest.mark.usefixtures("mlflow_server")

OPTIONS = {"header_metadata": {"X-Client-Version": "client_version"}, "header_tags": {"X-Tenant": "tenant"}}
MAPPED = ["x-request-id", "x-session-id", "x-user-id", "x-client-version", "x-tenant"]
SAFE_ID = re.compile(r"^[\x21\x23-\x26\x28-\x5b\x5d-\x5f\x61-\x7e]{1,50}$")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

hostile_bytes = st.one_of(
    st.binary(max_size=300),
    st.binary(min_size=5_000, max_size=20_000),
    st.sampled_from([b"a'b", b'"', b"`x`", b"\\", b"\r\nX-Injected: 1", b"\xff\xfe", b"' OR '1'='1", b" "]),
)


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"fine"})


ASGI = asgi.MlflowContextMiddleware(ok_app, **OPTIONS)


def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"fine"]


WSGI = wsgi.MlflowContextMiddleware(wsgi_app, **OPTIONS)


def check_response_headers(headers: list[tuple[str, str]]) -> None:
    names = {name.lower(): value for name, value in headers}
    assert SAFE_ID.match(names["x-request-id"]), names["x-request-id"]
    for value in names.values():
        assert "\r" not in value and "\n" not in value


def check_context(headers: dict[str, str]) -> None:
    ctx = build_context(Options(**OPTIONS), RequestView("GET", "/", "", headers))
    assert SAFE_ID.match(ctx.request_id) and len(ctx.request_id) <= MAX_ID_LENGTH
    for value in ctx.metadata.values():
        assert len(value) <= MAX_METADATA_LENGTH and not CONTROL.search(value)
    for value in ctx.tags.values():
        assert len(value) <= MAX_TAG_LENGTH and not CONTROL.search(value)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(values=st.fixed_dictionaries({name: hostile_bytes for name in MAPPED}))
def test_asgi_never_fails_on_hostile_headers(values: dict[str, bytes]) -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(k.encode(), v) for k, v in values.items()],
    }
    asyncio.run(ASGI(scope, receive, send))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"fine"
    check_response_headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in sent[0]["headers"]])
    check_context({k: v.decode("latin-1") for k, v in values.items()})


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(values=st.fixed_dictionaries({name: hostile_bytes for name in MAPPED}))
def test_wsgi_never_fails_on_hostile_headers(values: dict[str, bytes]) -> None:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    for name, value in values.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value.decode("latin-1")  # PEP 3333
    seen: list[Any] = []
    body = WSGI(environ, lambda status, headers, *exc: seen.append((status, headers)))
    assert b"".join(body) == b"fine"
    assert seen[0][0] == "200 OK"
    check_response_headers(seen[0][1])


def test_sampled_out_requests_have_no_span_and_drop_nested_spans() -> None:
    seen: list[tuple[object, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with mlflow.start_span("nested") as nested:
            seen.append((mlflow.get_current_active_span(), nested.trace_id))
        await ok_app(scope, receive, send)

    mw = asgi.MlflowContextMiddleware(app, sample_ratio=0.0)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    asyncio.run(mw({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send))
    names = {name for name, _ in sent[0]["headers"]}
    assert b"x-trace-id" not in {n.lower() for n in names}
    [(active, nested_trace)] = seen
    assert active is None  # no request span was made current
    assert nested_trace == "MLFLOW_NO_OP_SPAN_TRACE_ID"  # nested spans were dropped, not orphaned


def test_sample_ratio_traces_about_that_share() -> None:
    random.seed(7)
    mw = asgi.MlflowContextMiddleware(ok_app, sample_ratio=0.25)
    traced = 0

    async def run() -> None:
        nonlocal traced
        for _ in range(400):
            sent: list[dict[str, Any]] = []

            async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
                sent.append(message)

            async def receive() -> dict[str, Any]:
                return {"type": "http.request"}

            await mw({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)
            traced += any(name == b"x-trace-id" for name, _ in sent[0]["headers"])

    asyncio.run(run())
    assert 60 <= traced <= 140  # 25% of 400 = 100, binomial sd ~ 8.7
