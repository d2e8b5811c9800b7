"""What the middleware costs per request, in-process, against the floor, the seeds' hand-written
pattern and OpenTelemetry's middleware.

    python bench/overhead.py [--requests 400] [--rounds 15]

The same trivial raw ASGI (and WSGI) app is driven directly, variants interleaved round by round
(A B C ... A B C ...), after a warm-up; the figure is the median over rounds of the mean time per
request, and the overhead is that minus `bare`. A live local MLflow server (SQLite) receives the
traces with async export on, as in production. Prints a table; writes bench/results/*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
HEADERS = [(b"x-request-id", b"bench-req-1"), (b"x-session-id", b"s-1"), (b"x-user-id", b"u-1"),
           (b"content-type", b"application/json"), (b"accept", b"*/*"), (b"host", b"bench")]  # fmt: skip


# --- the app and the variants (ASGI) ---------------------------------------------------------------


async def bare_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def floor_middleware(app: Any) -> Any:
    """The least an MLflow middleware must do: one root span, same metadata and request id."""
    import mlflow

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        with mlflow.start_span(f"{scope['method']} {scope['path']}") as span:
            _floor_fields(headers[b"x-request-id"].decode(), headers[b"x-session-id"].decode(),
                          headers[b"x-user-id"].decode())  # fmt: skip
            await app(scope, receive, send)
            span.set_outputs({"status_code": 200})

    return middleware


def floor_wsgi(app: Any) -> Any:
    """The floor for WSGI: the body is consumed inside the span, as a streaming-aware one must."""
    import mlflow

    def middleware(environ: Any, start_response: Any) -> list[bytes]:
        with mlflow.start_span(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}") as span:
            _floor_fields(
                environ["HTTP_X_REQUEST_ID"], environ["HTTP_X_SESSION_ID"], environ["HTTP_X_USER_ID"]
            )
            body = list(app(environ, start_response))
            span.set_outputs({"status_code": 200})
        return body

    return middleware


def _floor_fields(request_id: str, session: str, user: str) -> None:
    import mlflow

    mlflow.update_current_trace(
        client_request_id=request_id,
        metadata={"mlflow.trace.session": session, "mlflow.trace.user": user},
    )


def seed_app() -> Any:
    """The seeds' pattern: an @mlflow.trace handler that calls update_current_trace itself."""
    import mlflow

    @mlflow.trace
    async def handler(scope: Any) -> bytes:
        headers = dict(scope["headers"])
        mlflow.update_current_trace(
            client_request_id=headers.get(b"x-request-id", b"").decode(),
            metadata={
                "mlflow.trace.session": headers.get(b"x-session-id", b"").decode(),
                "mlflow.trace.user": headers.get(b"x-user-id", b"").decode(),
                "mlflow.source.type": os.getenv("APP_ENVIRONMENT", "development"),
            },
        )
        return b"hello"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = await handler(scope)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": body})

    return app


class NullExporter:
    """Accepts every batch: OpenTelemetry's cost without a collector's."""

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def otel_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NullExporter()))  # type: ignore[arg-type]
    return provider


def asgi_variants(only: str | None = None) -> dict[str, tuple[Any, str]]:
    """Variant -> (app, path); `only` builds just that one (the lean install has no OTel/FastAPI)."""
    from mlflow_ctx_mw.asgi import MlflowContextMiddleware

    def otel() -> Any:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        return OpenTelemetryMiddleware(bare_app, tracer_provider=otel_provider())

    ours = MlflowContextMiddleware
    factories: dict[str, Callable[[], tuple[Any, str]]] = {
        "bare": lambda: (bare_app, "/chat"),
        "floor": lambda: (floor_middleware(bare_app), "/chat"),
        "seed": lambda: (seed_app(), "/chat"),
        "otel": lambda: (otel(), "/chat"),
        "ours": lambda: (ours(bare_app), "/chat"),
        "ours+feedback+exclusions": lambda: (ours(bare_app, exclude_paths=["/health", "/static/*"]), "/chat"),
        "ours, excluded path": lambda: (ours(bare_app, exclude_paths=["/health"]), "/health"),
        # The same two through FastAPI's add_middleware (ours also wraps the app's 500 handler).
        "fastapi floor": lambda: (fastapi_app(floor_middleware), "/chat"),
        "fastapi ours": lambda: (fastapi_app(ours), "/chat"),
    }
    return {name: make() for name, make in factories.items() if only in (None, name)}


def fastapi_app(middleware: Any) -> Any:
    from fastapi import FastAPI

    app = FastAPI()
    app.post("/chat")(_hello)
    app.add_middleware(middleware)
    return app


async def _hello() -> dict[str, str]:
    return {"message": "hello"}


def asgi_runner(app: Any, path: str) -> Callable[[int], None]:
    scope_template = {"type": "http", "method": "POST", "path": path, "query_string": b"", "headers": HEADERS,
                      "root_path": "", "scheme": "http", "http_version": "1.1",
                      "server": ("bench", 80)}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    async def many(n: int) -> None:
        for _ in range(n):
            await app(dict(scope_template), receive, send)

    loop = asyncio.new_event_loop()
    return lambda n: loop.run_until_complete(many(n))


# --- WSGI ----------------------------------------------------------------------------------------


def bare_wsgi(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def wsgi_variants(only: str | None = None) -> dict[str, tuple[Any, str]]:
    from mlflow_ctx_mw.wsgi import MlflowContextMiddleware as ours

    def otel() -> Any:
        from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

        return OpenTelemetryMiddleware(bare_wsgi, tracer_provider=otel_provider())

    factories: dict[str, Callable[[], tuple[Any, str]]] = {
        "bare": lambda: (bare_wsgi, "/chat"),
        "floor": lambda: (floor_wsgi(bare_wsgi), "/chat"),
        "otel": lambda: (otel(), "/chat"),
        "ours": lambda: (ours(bare_wsgi), "/chat"),
        "ours, excluded path": lambda: (ours(bare_wsgi, exclude_paths=["/health"]), "/health"),
    }
    return {name: make() for name, make in factories.items() if only in (None, name)}


def wsgi_runner(app: Any, path: str) -> Callable[[int], None]:
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
               "SERVER_NAME": "bench", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
               "HTTP_X_REQUEST_ID": "bench-req-1", "HTTP_X_SESSION_ID": "s-1",
               "HTTP_X_USER_ID": "u-1"}  # fmt: skip

    def start_response(*args: Any) -> None:
        pass

    def many(n: int) -> None:
        for _ in range(n):
            body = app(dict(environ), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close:
                close()

    return many


def runner_for(variant: str) -> Callable[[int], None]:
    """Any variant by name, WSGI ones as "wsgi <name>" (bench/instructions.py)."""
    if variant.startswith("wsgi "):
        name = variant.removeprefix("wsgi ")
        return wsgi_runner(*wsgi_variants(only=name)[name])
    return asgi_runner(*asgi_variants(only=variant)[variant])


# --- the harness ---------------------------------------------------------------------------------


def measure(
    variants: dict[str, tuple[Any, str]], runner: Any, requests: int, rounds: int
) -> dict[str, float]:
    runs = {name: runner(app, path) for name, (app, path) in variants.items()}
    for run in runs.values():  # warm-up
        run(requests)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():  # interleaved: A B C ... A B C ...
            start = time.perf_counter()
            run(requests)
            samples[name].append((time.perf_counter() - start) / requests * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE", "1000000")

    import mlflow

    from mlflow_ctx_mw.testing import local_mlflow_server

    with local_mlflow_server(Path(tempfile.mkdtemp(prefix="bench-"))) as url:
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("overhead")
        results = {
            "asgi": measure(asgi_variants(), asgi_runner, args.requests, args.rounds),
            "wsgi": measure(wsgi_variants(), wsgi_runner, args.requests, args.rounds),
        }
    report_and_exit(args, results)


def report_and_exit(args: argparse.Namespace, results: dict[str, dict[str, float]]) -> None:
    import mlflow

    report = {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
              "mlflow": mlflow.__version__, "requests_per_round": args.requests, "rounds": args.rounds,
              "us_per_request": results}  # fmt: skip
    for kind, figures in results.items():
        bare = figures["bare"]
        print(f"\n{kind.upper():<28}{'us/request':>12}{'above bare':>12}")
        for name, value in figures.items():
            print(f"{name:<28}{value:>12.1f}{value - bare:>12.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"overhead-{int(time.time())}.json").write_text(json.dumps(report, indent=2))
    sys.stdout.flush()
    os._exit(0)  # skip flushing thousands of queued bench traces (and the server's stop)


if __name__ == "__main__":
    main()
