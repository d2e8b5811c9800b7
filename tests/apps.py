"""The same small app in every framework the package supports, used by the integration tests.

Routes: /items/{id} (async where the framework has it), /sync-items/{id} (sync handler),
/boom (raises), /stream (three chunks, each made inside a nested span), /slow-stream (many slow
chunks, for client disconnects), /broken-stream (raises after its first chunk).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import mlflow
from fastapi import BackgroundTasks, Request  # resolved by name: annotations are strings here

#: Served without the middleware, to compare against (tests/served.py, outage timings).
BARE = os.environ.get("MLFLOW_CTX_BARE") == "1"
BACKGROUND_DONE = threading.Event()


def background_work(user: str) -> None:
    """A Starlette background task: runs after the response has gone out."""
    time.sleep(0.3)
    traced_after_response(user)
    BACKGROUND_DONE.set()


@mlflow.trace(name="after_response")
def traced_after_response(user: str) -> None:
    mlflow.update_current_trace(tags={"after_response_of": user})


STREAM_CHUNKS = 3
STREAM_DELAY = 0.05
SLOW_CHUNKS = 100
# The same options everywhere (Django reads them from djproj.settings.MLFLOW_CTX).
OPTIONS = {
    "header_tags": {"X-Tenant": "tenant"},
    "header_metadata": {"X-Client-Version": "client_version"},
    "feedback_wait_seconds": 20.0,
    "feedback_kinds": ["feedback", "expectation"],
    "feedback_rate_limit": 0,  # the suite posts more than a client would; limits: test_security.py
    "exclude_paths": ["/health", "/static/*"],
}


def sync_chunks(count: int, fail: bool = False):  # type: ignore[no-untyped-def]
    for i in range(count):
        time.sleep(STREAM_DELAY)
        yield chunk(i)
        if fail:
            raise RuntimeError("broken mid-stream")


async def async_chunks(count: int, fail: bool = False):  # type: ignore[no-untyped-def]
    for i in range(count):
        await asyncio.sleep(STREAM_DELAY)
        yield chunk(i)
        if fail:
            raise RuntimeError("broken mid-stream")


log = logging.getLogger("tests.apps")


@mlflow.trace(name="lookup")
def lookup(item_id: int) -> int:
    mlflow.update_current_trace(tags={"looked_up": str(item_id)})  # handler code updates our trace
    log.info("looked up %s", item_id)  # joined with the trace by TraceContextFilter
    return item_id * 2


def chunk(i: int) -> bytes:
    with mlflow.start_span(name=f"chunk-{i}"):
        return f"data: {i}\n\n".encode()


def bearer_auth() -> object:
    """Starlette's AuthenticationMiddleware with "Authorization: Bearer <name>" logging in."""
    from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware

    class Bearer(AuthenticationBackend):
        async def authenticate(self, conn):  # type: ignore[no-untyped-def]
            value = conn.headers.get("Authorization", "")
            return (
                (AuthCredentials(["authenticated"]), SimpleUser(value[7:]))
                if value.startswith("Bearer ")
                else None
            )

    return Middleware(AuthenticationMiddleware, backend=Bearer())


def fastapi_app(auth_inside: bool = False, **extra: object) -> object:
    """`auth_inside`: an authentication middleware inside ours (added before it)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from mlflow_ctx_mw.asgi import MlflowContextMiddleware

    app = FastAPI()
    if auth_inside:
        auth = bearer_auth()
        app.add_middleware(auth.cls, *auth.args, **auth.kwargs)  # type: ignore[attr-defined]

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"value": lookup(item_id)}

    @app.get("/sync-items/{item_id}")
    def sync_item(item_id: int) -> dict[str, int]:
        return {"value": lookup(item_id)}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(async_chunks(STREAM_CHUNKS), media_type="text/event-stream")

    @app.get("/slow-stream")
    async def slow_stream() -> StreamingResponse:
        return StreamingResponse(async_chunks(SLOW_CHUNKS), media_type="text/event-stream")

    @app.get("/broken-stream")
    async def broken_stream() -> StreamingResponse:
        return StreamingResponse(async_chunks(2, fail=True), media_type="text/event-stream")

    @app.get("/tracing-status")
    def tracing() -> dict[str, object]:  # a readiness probe's view
        from mlflow_ctx_mw import tracing_status

        return tracing_status().__dict__

    @app.get("/background")
    async def background(tasks: BackgroundTasks, request: Request) -> dict[str, str]:
        tasks.add_task(background_work, request.headers.get("X-User-ID", ""))
        return {"queued": "yes"}

    if not BARE:
        app.add_middleware(MlflowContextMiddleware, **{**OPTIONS, **extra})
    return app


def starlette_app(auth_inside: bool = False, **extra: object) -> object:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from mlflow_ctx_mw.asgi import MlflowContextMiddleware

    async def item(request):  # type: ignore[no-untyped-def]
        return JSONResponse({"value": lookup(int(request.path_params["item_id"]))})

    def sync_item(request):  # type: ignore[no-untyped-def]
        return JSONResponse({"value": lookup(int(request.path_params["item_id"]))})

    async def boom(request):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    async def stream(request):  # type: ignore[no-untyped-def]
        async def body():  # type: ignore[no-untyped-def]
            for i in range(STREAM_CHUNKS):
                await asyncio.sleep(STREAM_DELAY)
                yield await run_in_threadpool(chunk, i)

        return StreamingResponse(body(), media_type="text/event-stream")

    async def slow_stream(request):  # type: ignore[no-untyped-def]
        return StreamingResponse(async_chunks(SLOW_CHUNKS), media_type="text/event-stream")

    async def broken_stream(request):  # type: ignore[no-untyped-def]
        return StreamingResponse(async_chunks(2, fail=True), media_type="text/event-stream")

    app = Starlette(
        routes=[
            Route("/items/{item_id:int}", item),
            Route("/sync-items/{item_id:int}", sync_item),
            Route("/boom", boom),
            Route("/stream", stream),
            Route("/slow-stream", slow_stream),
            Route("/broken-stream", broken_stream),
        ],
        middleware=[bearer_auth()] if auth_inside else [],  # type: ignore[list-item]
    )
    # Plain Starlette: the middleware wraps the whole app.
    return app if BARE else MlflowContextMiddleware(app, **{**OPTIONS, **extra})


def flask_app(auth_inside: bool = False, **extra: object) -> object:
    """`auth_inside`: Flask-Login, "Authorization: Bearer <name>" logging in."""
    from flask import Flask, Response

    from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

    app = Flask(__name__)
    if auth_inside:
        bearer_login(app)

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> dict[str, int]:
        return {"value": lookup(item_id)}

    @app.get("/sync-items/<int:item_id>")
    def sync_item(item_id: int) -> dict[str, int]:
        return {"value": lookup(item_id)}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/stream")
    def stream() -> Response:
        return Response(sync_chunks(STREAM_CHUNKS), mimetype="text/event-stream")

    @app.get("/slow-stream")
    def slow_stream() -> Response:
        return Response(sync_chunks(SLOW_CHUNKS), mimetype="text/event-stream")

    @app.get("/broken-stream")
    def broken_stream() -> Response:
        return Response(sync_chunks(2, fail=True), mimetype="text/event-stream")

    @app.get("/tracing-status")
    def tracing() -> dict[str, object]:  # a readiness probe's view
        from mlflow_ctx_mw import tracing_status

        return tracing_status().__dict__

    if not BARE:
        app.wsgi_app = MlflowContextMiddleware(app.wsgi_app, **{**OPTIONS, **extra})  # type: ignore[method-assign]
    return app


def bearer_login(app: Any) -> None:
    """Flask-Login with `Authorization: Bearer <name>` logging <name> in (a test stand-in)."""
    from flask_login import LoginManager, UserMixin

    app.secret_key = "tests-flask-secret-key-0123456789"
    login = LoginManager(app)

    class User(UserMixin):
        def __init__(self, name: str) -> None:
            self.id = name

    @login.request_loader
    def load(request: Any) -> Any:
        value = request.headers.get("Authorization", "")
        return User(value[7:]) if value.startswith("Bearer ") else None
