"""Where traces go, decided once and off the request path; and the flush at shutdown.

With no experiment configured at all, MLflow asks its default-experiment providers for every
trace, and they try to import Databricks' and IPython's modules each time (0.3-0.4 ms per trace,
more than the rest of a trace's cost here): the middleware asks once and passes the id ("0") to
each root span.

With only MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID in the environment (no `set_experiment`,
no destination, no active run), MLflow looks the experiment up over HTTP when every trace starts,
on the request path: 3-70 ms per request here, and seconds per request (retries, then no trace)
while the server is down. The middleware resolves it once, in a thread it waits for at most
STARTUP_WAIT s when it is built, and hands the id to each root span; until it is known, requests
are served untraced (MLflow would block them and then drop their trace) and it retries every
RETRY_SECONDS.
"""

from __future__ import annotations

import threading
import time

from mlflow_ctx_mw import _mlflow
from mlflow_ctx_mw._logonce import log_once
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.export import watch_exports

__all__ = ["UNRESOLVED", "configure_destination", "experiment_for_span", "flush_pending"]

RETRY_SECONDS = 30.0
STARTUP_WAIT = 2.0
#: experiment_for_span(): the environment names an experiment not resolved yet.
UNRESOLVED = "<unresolved>"


class _EnvExperiment:
    """The environment's experiment id, resolved at most once at a time, retried after failures."""

    def __init__(self) -> None:
        self.experiment_id: str | None = None
        self._lock = threading.Lock()
        self._busy = False
        self._next_try = 0.0
        self.settled = threading.Event()  # a lookup finished (either way); tests wait on it

    def get(self) -> str:
        if self.experiment_id is None:
            self.start()
            log_once("env-experiment-wait", "experiment from MLFLOW_EXPERIMENT_NAME/_ID not resolved "
                     "yet: serving requests untraced until it is", exc_info=False)  # fmt: skip
            return UNRESOLVED
        return self.experiment_id

    def start(self) -> None:
        with self._lock:
            if self._busy or self.experiment_id is not None or time.monotonic() < self._next_try:
                return
            self._busy = True
        threading.Thread(target=self._resolve, name="mlflow-ctx-experiment", daemon=True).start()

    def _resolve(self) -> None:
        try:
            self.experiment_id = _mlflow.resolve_env_experiment()
        except Exception:
            log_once("env-experiment", "could not resolve MLFLOW_EXPERIMENT_NAME/_ID; retrying later")
            self._next_try = time.monotonic() + RETRY_SECONDS
        finally:
            self._busy = False
            self.settled.set()


ENV_EXPERIMENT = _EnvExperiment()


def configure_destination(options: Options) -> None:
    """Called once when a middleware is built; never raises."""
    watch_exports()
    if options.experiment_id is None:
        try:
            fallback = _mlflow.experiment_fallback()
            if fallback == "default":
                _mlflow.default_experiment_id()  # found now, off the request path
        except Exception:
            log_once("default-experiment", "could not tell where MLflow sends traces; leaving it to MLflow")
            return
        if fallback == "env":
            ENV_EXPERIMENT.start()
            ENV_EXPERIMENT.settled.wait(STARTUP_WAIT)
        return
    try:
        _mlflow.set_experiment_destination(options.experiment_id)
    except Exception:
        log_once("destination", "MLflow rejected experiment_id; traces go where MLflow decides")


def experiment_for_span() -> str | None:
    """The experiment id to start a root span with: None lets MLflow decide (its usual, cheap
    path), UNRESOLVED means serve this request untraced.

    Checked per request: the app may call `mlflow.set_experiment` after the middleware was built.
    """
    try:
        fallback = _mlflow.experiment_fallback()
        if fallback == "default":
            return _mlflow.default_experiment_id()
    except Exception:
        log_once("env-experiment-check", "could not tell where MLflow sends traces; leaving it to MLflow")
        return None
    return None if fallback is None else ENV_EXPERIMENT.get()


def flush_pending(timeout: float) -> bool:
    """Send what MLflow still holds, waiting at most `timeout` s; True if it all went out.

    uvicorn re-raises SIGTERM after its graceful shutdown, so atexit never runs and buffered
    traces would be lost (mlflow #21865): the ASGI adapter calls this at lifespan shutdown.
    """
    done = threading.Event()

    def flush() -> None:
        try:
            _mlflow.flush_export()
        except Exception:
            log_once("flush", "MLflow failed to flush pending traces at shutdown")
        finally:
            done.set()

    threading.Thread(target=flush, name="mlflow-ctx-flush", daemon=True).start()
    if not done.wait(timeout):
        log_once(
            "flush-timeout", f"pending traces not flushed within {timeout:g}s at shutdown", exc_info=False
        )
        return False
    return True
