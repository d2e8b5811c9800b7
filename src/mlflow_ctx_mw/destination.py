"""Where traces go, decided once and off the request path; and the flush at shutdown.

When the app sets no experiment in code (no `mlflow.set_experiment`, no destination, no active
run), MLflow finds one for every trace, and on several versions for every exported span:
- MLFLOW_EXPERIMENT_NAME / _ID in the environment: an HTTP lookup each time, on the request path
  (3-70 ms per request here; seconds of retries, then no trace, while the server is down). The
  lean `mlflow-tracing` package cannot even do it (MLflow's lookup needs MlflowClient, which that
  package leaves out): every request went untraced.
- nothing at all: its default-experiment providers, which try to import Databricks' and
  IPython's modules each time (0.3-0.4 ms per trace); the lean package has no providers (they
  need PyYAML) and traced nothing.

The middleware settles it once, as the app would: in a thread it waits for at most
STARTUP_WAIT s when built, it makes that experiment the process's active one with
`mlflow.set_experiment` (creating a named one that is missing, as MLflow does), after which MLflow
takes its cheap path. Meanwhile root spans are given the id when it is known without a lookup (an
_ID, the default "0"); a name not resolved yet means requests are served untraced, retried every
RETRY_SECONDS. An experiment the app sets in code, at any time, wins.
"""

from __future__ import annotations

import threading
import time

from mlflow_ctx_mw import _mlflow
from mlflow_ctx_mw._logonce import log_once
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.export import watch_exports

__all__ = ["UNRESOLVED", "app_experiment", "configure_destination", "experiment_for_span", "flush_pending"]

RETRY_SECONDS = 30.0
STARTUP_WAIT = 2.0
#: experiment_for_span(): the environment names an experiment not resolved yet.
UNRESOLVED = "<unresolved>"


class _Adoption:
    """The experiment MLflow would look up per trace, made active once; retried after failures."""

    def __init__(self) -> None:
        #: What root spans are given until MLflow knows it: an id found without a lookup.
        self.known: str | None = None
        self._lock = threading.Lock()
        self._busy = False
        self._next_try = 0.0
        self.settled = threading.Event()  # an attempt finished (either way); start-up waits on it

    def span_experiment(self, fallback: str) -> str:
        self.start(fallback)
        if self.known is None:
            log_once("env-experiment-wait", "experiment from MLFLOW_EXPERIMENT_NAME/_ID not resolved "
                     "yet: serving requests untraced until it is", exc_info=False)  # fmt: skip
            return UNRESOLVED
        return self.known

    def start(self, fallback: str) -> None:
        with self._lock:
            if self._busy or time.monotonic() < self._next_try:
                return
            self._busy = True
            self.settled.clear()
        self.known = self.known or _mlflow.experiment_without_lookup(fallback)
        thread = threading.Thread(target=self._adopt, args=(fallback,), name="mlflow-ctx-experiment")
        thread.daemon = True
        thread.start()

    def _adopt(self, fallback: str) -> None:
        try:
            self.known = _mlflow.adopt_experiment(fallback) or self.known
        except Exception:
            log_once(f"adopt-{fallback}", "could not settle the experiment MLflow would use "
                     "(MLFLOW_EXPERIMENT_NAME/_ID, or the default); retrying later")  # fmt: skip
            self._next_try = time.monotonic() + RETRY_SECONDS
        finally:
            self._busy = False
            self.settled.set()


ADOPTION = _Adoption()


class _TrackingUri:
    """The lean package with no MLFLOW_TRACKING_URI has nowhere to send traces: MLflow fails,
    warns and retries its set-up on every request (1.4 ms each, measured). Checked when the
    middleware is built and then at most every RETRY_SECONDS (the app may set it later)."""

    def __init__(self) -> None:
        self.missing = False
        self._next_check = 0.0

    def check(self) -> bool:
        self._next_check = time.monotonic() + RETRY_SECONDS
        self.missing = not _mlflow.tracking_uri_usable()
        if self.missing:
            log_once("no-tracking-uri", "no MLflow tracking server configured (MLFLOW_TRACKING_URI, or "
                     "mlflow.set_tracking_uri): the lean mlflow-tracing package can only send traces to "
                     "one, so requests are served untraced until one is set", exc_info=False)  # fmt: skip
        return self.missing

    def missing_now(self) -> bool:
        return self.missing and (time.monotonic() < self._next_check or self.check())


TRACKING_URI = _TrackingUri()


def configure_destination(options: Options) -> None:
    """Called once when a middleware is built; never raises."""
    watch_exports()
    try:
        _mlflow.cache_missing_imports()
    except Exception:
        log_once("imports", "could not check MLflow's optional modules")
    if TRACKING_URI.check():
        return
    if options.experiment_id is not None:
        try:
            _mlflow.set_experiment_destination(options.experiment_id)
        except Exception:
            log_once("destination", "MLflow rejected experiment_id; traces go where MLflow decides")
        return
    try:
        fallback = _mlflow.experiment_fallback()
        if fallback is not None:
            ADOPTION.start(fallback)
            ADOPTION.settled.wait(STARTUP_WAIT)
    except Exception:
        log_once("experiment-check", "could not tell where MLflow sends traces; leaving it to MLflow")


def experiment_for_span() -> str | None:
    """The experiment id to start a root span with: None lets MLflow decide (its usual, cheap
    path), UNRESOLVED means serve this request untraced.

    Checked per request: the app may call `mlflow.set_experiment` after the middleware was built.
    """
    if TRACKING_URI.missing_now():
        return UNRESOLVED
    try:
        fallback = _mlflow.experiment_fallback()
    except Exception:
        log_once("experiment-check", "could not tell where MLflow sends traces; leaving it to MLflow")
        return None
    return None if fallback is None else ADOPTION.span_experiment(fallback)


def app_experiment(options: Options) -> str | None:
    """The experiment this app's traces go to, for searching them (None: not known yet)."""
    if options.experiment_id is not None:
        return options.experiment_id
    try:
        return _mlflow.configured_experiment() or ADOPTION.known
    except Exception:
        log_once("app-experiment", "could not tell which experiment this app traces to")
        return None


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
