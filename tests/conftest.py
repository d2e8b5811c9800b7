"""Real parts: a real `mlflow server` (SQLite, 127.0.0.1) and the example apps under real servers.

The apps run in this process (uvicorn / waitress in a thread) so that each test can read back,
through MLflow's own client, exactly what the middleware exported.

Two switches make the same tests run where users are (`make compat`):
- MLFLOW_CTX_SERVER_PYTHON: the Python whose full `mlflow` runs the tracking server, so that this
  process may hold only the lean `mlflow-tracing` (as an app in production does);
- MLFLOW_CTX_CONFIG=code|env: the apps' experiment set by `mlflow.set_experiment` in code, or
  named only by MLFLOW_TRACKING_URI + MLFLOW_EXPERIMENT_NAME in the environment.
- MLFLOW_CTX_TRACKING_URI: use this running server instead of starting one (the version sweep);
- MLFLOW_CTX_ADAPTERS: a comma-separated subset of ADAPTERS to serve.
Readers below always name the experiment, so they work on either install and either way.
"""

from __future__ import annotations

import contextlib
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

import httpx
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
# Signs the feedback tokens the apps hand out (the default feedback_auth="token" needs one).
FEEDBACK_SECRET = "tests-feedback-secret-0123456789"
os.environ.setdefault("MLFLOW_CTX_FEEDBACK_SECRET", FEEDBACK_SECRET)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
# Every app of the session spools here (a subdirectory per tracking server and experiment).
os.environ.setdefault("MLFLOW_CTX_SPOOL_DIR", tempfile.mkdtemp(prefix="mlflow-ctx-spool-"))
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


CONFIG = os.environ.get("MLFLOW_CTX_CONFIG", "code")
SERVER_PYTHON = os.environ.get("MLFLOW_CTX_SERVER_PYTHON") or sys.executable
EXPERIMENT = f"tests-{uuid.uuid4().hex[:8]}"
_state: dict[str, str] = {}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a SQLite store in a temp dir; the apps' experiment set as CONFIG says."""
    import mlflow

    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(_store_dir(tmp_path_factory))
        url = os.environ.get("MLFLOW_CTX_TRACKING_URI") or stack.enter_context(
            local_mlflow_server(workdir, python=SERVER_PYTHON)
        )
        _state["url"] = url
        _state["log"] = str(workdir / "mlflow.log")
        os.environ["MLFLOW_TRACKING_URI"] = url
        mlflow.set_tracking_uri(url)
        if CONFIG == "env":  # the apps find (and create) it themselves, as in a container
            os.environ["MLFLOW_EXPERIMENT_NAME"] = EXPERIMENT
        else:
            mlflow.set_experiment(EXPERIMENT)
        yield url
        mlflow.flush_trace_async_logging()  # nothing left to send to a server that is going away


def rest(method: str, endpoint: str, **kwargs: object) -> dict:
    """The tracking server's REST API, for what the lean package's client cannot do."""
    response = httpx.request(method, f"{_state['url']}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
    response.raise_for_status()
    return dict(response.json())


def experiment_named(name: str) -> str | None:
    """An experiment's id by name, or None (asked over REST: no client-side state involved)."""
    response = httpx.get(
        f"{_state['url']}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": name},
        timeout=30,
    )
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return str(response.json()["experiment"]["experiment_id"])


def create_experiment(name: str) -> str:
    return str(rest("POST", "experiments/create", json={"name": name})["experiment_id"])


def experiment_id() -> str:
    """The suite's experiment. In env mode the first app built creates it (as MLflow would);
    a test that needs it before any app exists creates it here."""
    if "experiment_id" not in _state:
        found = experiment_named(EXPERIMENT)
        if found is None:
            try:
                found = create_experiment(EXPERIMENT)
            except httpx.HTTPStatusError:  # an app created it meanwhile
                found = experiment_named(EXPERIMENT)
        assert found is not None
        _state["experiment_id"] = found
    return _state["experiment_id"]


def search(filter_string: str | None = None, experiment: str | None = None, **kwargs: object) -> list:
    """mlflow.search_traces on one experiment, on every supported version (lean or full)."""
    import inspect

    import mlflow

    where = [experiment or experiment_id()]
    parameters = inspect.signature(mlflow.search_traces).parameters
    named = "locations" if "locations" in parameters else "experiment_ids"  # before 3.5
    found = mlflow.search_traces(filter_string=filter_string, return_type="list", **{named: where}, **kwargs)
    return list(found)


def find_traces(filter_string: str, expected: int = 1, timeout: float = 30.0) -> list:
    """Traces matching the filter, polled until `expected` have been exported (or timeout)."""
    deadline = time.monotonic() + timeout
    found: list = []
    while time.monotonic() < deadline:
        found = search(filter_string)
        if len(found) >= expected:
            time.sleep(0.3)  # would a duplicate land too?
            return search(filter_string)
        time.sleep(0.2)
    return list(found)


def get_trace(trace_id: str, timeout: float = 30.0, *, ours: bool = True):  # type: ignore[no-untyped-def]
    """The trace once MLflow has all of it. A trace the middleware made (`ours`) always has a
    client request id: without one, the server holds only its spans so far (MLflow exports spans
    and the trace's info in separate calls; 3.5-3.11 send spans as they end)."""
    import mlflow

    deadline = time.monotonic() + timeout
    while True:
        trace = mlflow.get_trace(trace_id)
        complete = trace is not None and (not ours or trace.info.client_request_id is not None)
        if complete or time.monotonic() > deadline:
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
    def __init__(self, app: object, url_prefix: str = "") -> None:
        import waitress

        self.server = waitress.create_server(app, host="127.0.0.1", port=0, threads=8, url_prefix=url_prefix)
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
if os.environ.get("MLFLOW_CTX_ADAPTERS"):
    ADAPTERS = [name for name in ADAPTERS if name in os.environ["MLFLOW_CTX_ADAPTERS"].split(",")]


@pytest.fixture(scope="session", params=ADAPTERS)
def served(request: pytest.FixtureRequest, mlflow_server: str) -> Iterator[tuple[str, str]]:
    """(adapter name, base URL) of the test app under its real server."""
    factory, server = _apps()[request.param]
    with server(factory()) as url:
        yield request.param, url


@contextmanager
def serve(adapter: str, **options: object) -> Iterator[str]:
    """The test app of `adapter` with these options over apps.OPTIONS, under its real server
    (Django reads them from settings.MLFLOW_CTX, as a project would)."""
    import apps

    factory, server = _apps()[adapter]
    if adapter.startswith("django"):
        import django
        from django.test.utils import override_settings

        django.setup(set_prefix=False)  # settings loaded before they are overridden

        with override_settings(MLFLOW_CTX={**apps.OPTIONS, **options}):
            app = factory()
    else:
        app = factory(**options)
    with server(app) as url:
        yield url


def tracking_server_log() -> str:
    """What the tracking server logged so far (one line per request it received)."""
    return Path(_state["log"]).read_text(errors="replace") if "log" in _state else ""
