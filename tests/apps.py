"""The same small app in every framework the package supports, used by the integration tests.

Routes: /items/{id} (async where the framework has it), /sync-items/{id} (sync handler),
/boom (raises), /stream (three chunks, each made inside a nested span).
"""

from __future__ import annotations

import asyncio
import time

import mlflow

STREAM_CHUNKS = 3
STREAM_DELAY = 0.05
# The same options everywhere (Django reads them from djproj.settings.MLFLOW_CTX).
OPTIONS = {
    "header_tags": {"X-Tenant": "tenant"},
    "header_metadata": {"X-Client-Version": "client_version"},
    "feedback_wait_seconds": 2.0,
}


@mlflow.trace(name="lookup")
def lookup(item_id: int) -> int:
    mlflow.update_current_trace(tags={"looked_up": str(item_id)})  # handler code updates our trace
    return item_id * 2


def chunk(i: int) -> bytes:
    with mlflow.start_span(name=f"chunk-{i}"):
        return f"data: {i}\n\n".encode()


def fastapi_app() -> object:
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from mlflow_ctx_mw.asgi import MlflowContextMiddleware

    app = FastAPI()

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
        async def body():  # type: ignore[no-untyped-def]
            for i in range(STREAM_CHUNKS):
                await asyncio.sleep(STREAM_DELAY)
                yield chunk(i)

        return StreamingResponse(body(), media_type="text/event-stream")

    app.add_middleware(MlflowContextMiddleware, **OPTIONS)
    return app


def starlette_app() -> object:
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

    app = Starlette(
        routes=[
            Route("/items/{item_id:int}", item),
            Route("/sync-items/{item_id:int}", sync_item),
            Route("/boom", boom),
            Route("/stream", stream),
        ]
    )
    # Plain Starlette: the middleware wraps the whole app.
    return MlflowContextMiddleware(app, **OPTIONS)


def flask_app() -> object:
    from flask import Flask, Response

    from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

    app = Flask(__name__)

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
        def body():  # type: ignore[no-untyped-def]
            for i in range(STREAM_CHUNKS):
                time.sleep(STREAM_DELAY)
                yield chunk(i)

        return Response(body(), mimetype="text/event-stream")

    app.wsgi_app = MlflowContextMiddleware(app.wsgi_app, **OPTIONS)  # type: ignore[method-assign]
    return app
