"""Tracing never breaks the host app: failures in MLflow or in our code are logged once."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

import pytest

from mlflow_ctx_mw import _logonce, _mlflow, asgi, wsgi

pytestmark = pytest.mark.usefixtures("mlflow_server")


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": b"hello"})


def call_asgi(app: Any, scope_type: str = "http") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    scope = {"type": scope_type, "method": "GET", "path": "/p", "headers": [(b"x-user-id", b"u")]}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, scope


def boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("mlflow exploded")


@pytest.fixture(autouse=True)
def fresh_log_once() -> None:
    _logonce.reset()


@pytest.mark.parametrize("broken", ["start_root_span", "attach", "detach", "end_span"])
def test_asgi_serves_unchanged_when_mlflow_fails(
    broken: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_mlflow, broken, boom)
    app = asgi.MlflowContextMiddleware(hello)
    for _ in range(3):
        sent, _ = call_asgi(app)
        assert sent[0]["status"] == 201
        assert (b"x-app", b"1") in sent[0]["headers"]
        assert sent[1]["body"] == b"hello"
    warnings = [r for r in caplog.records if r.name == "mlflow_ctx_mw" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.message for r in warnings]


def test_asgi_no_trace_header_when_span_could_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_mlflow, "start_root_span", boom)
    sent, _ = call_asgi(asgi.MlflowContextMiddleware(hello))
    assert b"x-trace-id" not in {name.lower() for name, _ in sent[0]["headers"]}


@pytest.mark.parametrize("broken", ["start_root_span", "attach", "detach", "end_span"])
def test_wsgi_serves_unchanged_when_mlflow_fails(
    broken: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_mlflow, broken, boom)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("201 Created", [("X-App", "1")])
        yield b"hel"
        yield b"lo"

    mw = wsgi.MlflowContextMiddleware(app)

    def serve() -> None:
        seen: list[Any] = []
        body = mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/p"}, lambda s, h, *e: seen.append((s, h)))
        assert b"".join(body) == b"hello"
        body.close()  # type: ignore[attr-defined]
        assert seen[0][0] == "201 Created" and ("X-App", "1") in seen[0][1]

    for _ in range(3):
        # Its own context, as a server thread has: with detach broken the span stays attached there.
        contextvars.copy_context().run(serve)
    warnings = [r for r in caplog.records if r.name == "mlflow_ctx_mw" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.message for r in warnings]


def test_our_own_bug_in_mapping_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_ctx_mw import span

    monkeypatch.setattr(span, "build_context", boom)
    sent, _ = call_asgi(asgi.MlflowContextMiddleware(hello))
    assert sent[0]["status"] == 201 and sent[0]["headers"] == [(b"x-app", b"1")]


def test_websocket_passes_through_untouched() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    scope = {"type": "websocket", "path": "/ws"}

    async def receive() -> dict[str, Any]:
        return {}

    async def send(message: Any) -> None:
        pass

    asyncio.run(asgi.MlflowContextMiddleware(app)(scope, receive, send))
    assert seen == [(scope, receive, send)] and scope == {"type": "websocket", "path": "/ws"}


def test_lifespan_messages_pass_unchanged_and_shutdown_flushes(monkeypatch: pytest.MonkeyPatch) -> None:
    flushed: list[str] = []
    monkeypatch.setattr(_mlflow, "flush_export", lambda: flushed.append("flushed"))
    events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope == {"type": "lifespan"}
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    async def receive() -> dict[str, Any]:
        return events.pop(0)

    async def send(message: Any) -> None:
        sent.append((message, list(flushed)))

    asyncio.run(asgi.MlflowContextMiddleware(app)({"type": "lifespan"}, receive, send))
    assert sent == [
        ({"type": "lifespan.startup.complete"}, []),
        ({"type": "lifespan.shutdown.complete"}, ["flushed"]),
    ]


def test_app_exception_is_reraised_unchanged() -> None:
    class Custom(Exception):
        pass

    err = Custom("from the app")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise err

    with pytest.raises(Custom) as caught:
        call_asgi(asgi.MlflowContextMiddleware(app))
    assert caught.value is err
