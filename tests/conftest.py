"""Real parts: a real `mlflow server` (SQLite, 127.0.0.1) and the example apps under real servers.

The apps run in this process (uvicorn / waitress in a thread) so that each test can read back,
through MLflow's own client, exactly what the middleware exported.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mlflow_ctx_mw.testing import free_port, local_mlflow_server, wait_http

sys.path.insert(0, str(Path(__file__).parent))

ENV_FIELDS = {
    "APP_ENVIRONMENT": "staging",
    "APP_VERSION": "1.2.3",
    "DEPLOYMENT_ID": "dep-42",
    "REGION": "eu-west-1",
}
# Read by the middleware once, when it is built: set before any app exists.
os.environ.update(ENV_FIELDS)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproj.settings")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
# MLflow's batch span processor waits up to 5 s before exporting; tests read traces back at once.
os.environ.setdefault("MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS", "100")


@contextmanager
def _store_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """On tmpfs when there is one: SQLite's fsyncs, not CPU, were a third of the ingest time."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path_factory.mktemp("mlflow")
        return
    path = Path(tempfile.mkdtemp(prefix="mlflow-ctx-tests-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a SQLite store in a temp dir; tracking URI and experiment point at it."""
    import mlflow

    with _store_dir(tmp_path_factory) as workdir, local_mlflow_server(workdir) as url:
        os.environ["MLFLOW_TRACKING_URI"] = url
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment(f"tests-{uuid.uuid4().hex[:8]}")
        yield url
        mlflow.flush_trace_async_logging()  # nothing left to send to a server that is going away


def find_traces(filter_string: str, expected: int = 1, timeout: float = 30.0) -> list:
    """Traces matching the filter, polled until `expected` have been exported (or timeout)."""
    import mlflow

    deadline = time.monotonic() + timeout
    found: list = []
    while time.monotonic() < deadline:
        found = mlflow.search_traces(filter_string=filter_string, return_type="list")
        if len(found) >= expected:
            time.sleep(0.3)  # would a duplicate land too?
            return list(mlflow.search_traces(filter_string=filter_string, return_type="list"))
        time.sleep(0.2)
    return list(found)


def get_trace(trace_id: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    import mlflow

    deadline = time.monotonic() + timeout
    while True:
        trace = mlflow.get_trace(trace_id)
        if trace is not None or time.monotonic() > deadline:
            return trace
        time.sleep(0.2)


# --- servers -----------------------------------------------------------------------------------


class UvicornThread:
    def __init__(self, app: object) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="auto")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class WaitressThread:
    def __init__(self, app: object) -> None:
        import waitress

        self.server = waitress.create_server(app, host="127.0.0.1", port=0, threads=8)
        self.port = self.server.effective_port  # type: ignore[union-attr]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        url = f"http://127.0.0.1:{self.port}"
        wait_http(url, timeout=30)
        return url

    def __exit__(self, *exc: object) -> None:
        self.server.close()
        self.thread.join(timeout=10)


def _django_wsgi() -> object:
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def _django_asgi() -> object:
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


def _apps() -> dict[str, tuple[Callable[[], object], type]]:
    import apps

    return {
        "fastapi": (apps.fastapi_app, UvicornThread),
        "starlette": (apps.starlette_app, UvicornThread),
        "flask": (apps.flask_app, WaitressThread),
        "django-wsgi": (_django_wsgi, WaitressThread),
        "django-asgi": (_django_asgi, UvicornThread),
    }


ADAPTERS = ["fastapi", "starlette", "flask", "django-wsgi", "django-asgi"]


@pytest.fixture(scope="session", params=ADAPTERS)
def served(request: pytest.FixtureRequest, mlflow_server: str) -> Iterator[tuple[str, str]]:
    """(adapter name, base URL) of the test app under its real server."""
    factory, server = _apps()[request.param]
    with server(factory()) as url:
        yield request.param, url
