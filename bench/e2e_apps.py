"""Hello-world apps for bench/e2e.py, traced or not by BENCH_VARIANT (bare | floor | ours).

`floor` (FastAPI only) is bench/overhead.py's minimal MLflow middleware: MLflow's own cost.

    uvicorn e2e_apps:fastapi_app          gunicorn e2e_apps:flask_app
    gunicorn e2e_apps:django_wsgi         uvicorn e2e_apps:django_asgi

/_stats (never traced) answers the middleware's export_stats() so the driver can report drops.
"""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any

from mlflow_ctx_mw import export_stats

VARIANT = os.environ.get("BENCH_VARIANT", "bare")
OURS = VARIANT == "ours"
#: Our options: /_stats untraced, plus any given as JSON by `bench/e2e.py --ours-options`.
OPTIONS: dict[str, Any] = {"exclude_paths": ["/_stats"], **json.loads(os.environ.get("BENCH_OPTIONS", "{}"))}


if VARIANT != "bare":  # the same destination set-up for every traced variant
    import mlflow

    from mlflow_ctx_mw.export import watch_exports

    mlflow.set_experiment(experiment_id=os.environ["MLFLOW_EXPERIMENT_ID"])
    watch_exports()  # drop counters for the floor too (ours installs them itself): same hooks


class GcWatch:
    """Collections and their pauses: end to end, the tail latency is mostly full collections."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_ms = [0.0, 0.0, 0.0]
        self.longest_ms = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = (time.perf_counter() - self._started) * 1e3
        self.collections[info["generation"]] += 1
        self.pause_ms[info["generation"]] += pause
        self.longest_ms = max(self.longest_ms, pause)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


GC = GcWatch()
gc.callbacks.append(GC)


def _stats() -> dict[str, Any]:
    """Export drops so far; collections since the last call."""
    collected = {key: value for key, value in vars(GC).items() if not key.startswith("_")}
    GC.reset()
    return {**export_stats().__dict__, "gc": collected}


def _fastapi() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"message": "hello"}

    @app.get("/_stats")
    async def stats() -> dict[str, Any]:
        return _stats()

    if OURS:
        from mlflow_ctx_mw.asgi import MlflowContextMiddleware

        app.add_middleware(MlflowContextMiddleware, **OPTIONS)
    if VARIANT == "floor":
        from overhead import floor_middleware

        def floor_http_only(inner: Any) -> Any:
            traced = floor_middleware(inner)

            async def middleware(scope: Any, receive: Any, send: Any) -> None:
                plain = scope["type"] != "http" or scope["path"] == "/_stats"
                await (inner if plain else traced)(scope, receive, send)

            return middleware

        app.add_middleware(floor_http_only)
    return app


def _flask() -> Any:
    from flask import Flask

    app = Flask(__name__)
    app.get("/hello")(lambda: {"message": "hello"})
    app.get("/_stats")(_stats)
    if OURS:
        from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

        app.wsgi_app = MlflowContextMiddleware(app.wsgi_app, **OPTIONS)  # type: ignore[method-assign]
    return app


def _django() -> None:
    import django
    from django.conf import settings
    from django.http import HttpResponse
    from django.urls import path

    def hello(request: Any) -> HttpResponse:
        return HttpResponse(json.dumps({"message": "hello"}), content_type="application/json")

    def stats(request: Any) -> HttpResponse:
        return HttpResponse(json.dumps(_stats()), content_type="application/json")

    global urlpatterns
    urlpatterns = [path("hello", hello), path("_stats", stats)]
    middleware = ["mlflow_ctx_mw.django.MlflowContextMiddleware"] if OURS else []
    settings.configure(
        DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, MIDDLEWARE=middleware,
        SECRET_KEY="bench-only", MLFLOW_CTX=OPTIONS, INSTALLED_APPS=[], DATABASES={},
    )  # fmt: skip
    django.setup()


urlpatterns: list[Any] = []
_target = os.environ.get("BENCH_TARGET", "")
if _target == "fastapi":
    fastapi_app = _fastapi()
elif _target == "flask":
    flask_app = _flask()
elif _target == "django-wsgi":
    _django()
    from django.core.wsgi import get_wsgi_application

    django_wsgi = get_wsgi_application()
elif _target == "django-asgi":
    _django()
    from django.core.asgi import get_asgi_application

    django_asgi = get_asgi_application()

if os.environ.get("BENCH_GC_FREEZE") == "1":  # what an app can do at the end of its start-up
    gc.freeze()
