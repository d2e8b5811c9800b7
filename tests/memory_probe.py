"""Drive N requests through one adapter in-process; print resident memory and MLflow's buffers.

    python tests/memory_probe.py asgi|wsgi|django N

Run by tests/test_memory.py in a subprocess whose tracking URI points at a closed port, so that
the exporter fails fast and memory shows what the middleware and MLflow keep, not a server.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
from typing import Any

import mlflow

from mlflow_ctx_mw import export_stats

BARE = os.environ.get("MLFLOW_CTX_BARE") == "1"  # the same app without the middleware


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@mlflow.trace(name="work")
def work(i: int) -> int:
    return i * 2


def asgi_driver(options: dict[str, Any]) -> Any:
    from mlflow_ctx_mw.asgi import MlflowContextMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        work(1)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    mw = app if BARE else MlflowContextMiddleware(app, **options)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    async def many(start: int, count: int) -> None:
        for i in range(start, start + count):
            headers = [(b"x-user-id", f"u{i}".encode()), (b"x-session-id", f"s{i % 100}".encode())]
            await mw(
                {"type": "http", "method": "GET", "path": f"/items/{i}", "headers": headers}, receive, send
            )

    return lambda start, count: asyncio.run(many(start, count))


def wsgi_driver(options: dict[str, Any]) -> Any:
    from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

    def app(environ: Any, start_response: Any) -> Any:
        work(1)
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"ok"

    mw = app if BARE else MlflowContextMiddleware(app, **options)

    def many(start: int, count: int) -> None:
        for i in range(start, start + count):
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/items/{i}", "HTTP_X_USER_ID": f"u{i}"}
            body = mw(environ, lambda *a: None)
            b"".join(body)
            body.close()  # type: ignore[attr-defined]

    return many


def django_driver(options: dict[str, Any]) -> Any:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, SECRET_KEY="probe", MLFLOW_CTX=options,
        MIDDLEWARE=[] if BARE else ["mlflow_ctx_mw.django.MlflowContextMiddleware"],
    )  # fmt: skip
    django.setup()
    from django.http import HttpResponse
    from django.test import Client
    from django.urls import path

    def view(request: Any, item_id: int) -> HttpResponse:
        work(item_id)
        return HttpResponse(b"ok")

    global urlpatterns
    urlpatterns = [path("items/<int:item_id>", view)]
    client = Client()

    def many(start: int, count: int) -> None:
        for i in range(start, start + count):
            client.get(f"/items/{i}", HTTP_X_USER_ID=f"u{i}")

    return many


def main() -> None:
    adapter, total = sys.argv[1], int(sys.argv[2])
    if BARE:
        mlflow.tracing.disable()  # the baseline: the same app, no tracing at all
    options = {"experiment_id": os.environ.get("MLFLOW_CTX_EXPERIMENT_ID", "0")}
    drive = {"asgi": asgi_driver, "wsgi": wsgi_driver, "django": django_driver}[adapter](options)
    warmup = min(20_000, total // 5)
    drive(0, warmup)
    after_warmup = rss_mb()
    half = (total - warmup) // 2
    drive(warmup, half)
    at_half = rss_mb()
    drive(warmup + half, total - warmup - half)
    from mlflow.tracing.trace_manager import InMemoryTraceManager

    print(
        json.dumps(
            {
                "adapter": adapter,
                "requests": total,
                "rss_after_warmup_mb": round(after_warmup, 1),
                "rss_half_mb": round(at_half, 1),
                "rss_end_mb": round(rss_mb(), 1),
                "open_traces_in_mlflow_buffer": len(InMemoryTraceManager.get_instance()._traces),
                "export": export_stats().__dict__,
            }
        )
    )
    os._exit(0)  # skip the exporter's exit flush towards the closed port


if __name__ == "__main__":
    main()
