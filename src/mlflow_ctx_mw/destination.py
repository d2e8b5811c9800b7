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

The middleware settles it once, as the app would: in a thread started when it is built, it makes
that experiment the process's active one with `mlflow.set_experiment` (creating a named one that
is missing, as MLflow does), after which MLflow takes its cheap path. Meanwhile root spans are
given the id when it is known without a lookup (an _ID, the default "0"). A name not resolved yet
holds requests back until it is, for at most `startup_wait_seconds` after the middleware was built
(ASGI: the lifespan startup waits instead, before the server takes traffic), so that a cold start
traces its first request; past that, requests are served untraced (said once, loudly; retried
every RETRY_SECONDS) and `tracing_status()` says why. An experiment the app sets in code wins.
With the spool on, such requests are traced all the same: their traces start with a placeholder
experiment, go to the spool whole, and get the experiment when the spool replays them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from mlflow_ctx_mw import _exporter, _mlflow
from mlflow_ctx_mw._logonce import log_once
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.export import watch_exports
from mlflow_ctx_mw.replay import PLACEHOLDER, SPOOLER

__all__ = [
    "UNRESOLVED",
    "TracingStatus",
    "app_experiment",
    "await_ready",
    "configure_destination",
    "configure_spool",
    "experiment_for_span",
    "resolve_now",
    "startup_wait",
    "tracing_status",
    "wait_until_ready",
]

logger = logging.getLogger("mlflow_ctx_mw")
RETRY_SECONDS = 30.0
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
        #: Why the last attempt failed (for tracing_status), or None.
        self.failure: str | None = None

    @property
    def busy(self) -> bool:
        """An attempt is under way."""
        return self._busy

    def span_experiment(self, fallback: str) -> str:
        self.start(fallback)
        if self.known is not None:
            return self.known
        # Traced into the spool until it is resolved; served untraced without one.
        return PLACEHOLDER if SPOOLER.active and fallback == "env" else UNRESOLVED

    def retry_now(self) -> None:
        self._next_try = 0.0

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
            with _exporter.watched():  # one brief retry: while it lasts, requests wait
                self.known = _mlflow.adopt_experiment(fallback) or self.known
            self.failure = None
        except Exception as exc:
            log_once(f"adopt-{fallback}", "could not settle the experiment MLflow would use "
                     "(MLFLOW_EXPERIMENT_NAME/_ID, or the default); retrying later")  # fmt: skip
            self.failure = f"{type(exc).__name__}: {str(exc)[:200]}"
            self._next_try = time.monotonic() + RETRY_SECONDS
        finally:
            self._busy = False
            self.settled.set()


ADOPTION = _Adoption()


def resolve_now() -> str | None:
    """The experiment from MLFLOW_EXPERIMENT_NAME, resolved in this thread if it is not yet
    (the spool's worker, replaying traces spooled before it was); None while it cannot be."""
    if ADOPTION.known is None:
        if not ADOPTION.busy:
            ADOPTION.retry_now()
            ADOPTION.start("env")
        ADOPTION.settled.wait(2 * _exporter.WATCHED_TIMEOUT)
    return ADOPTION.known


class _Startup:
    """Until when a request without a destination may wait for one (set when built)."""

    def __init__(self) -> None:
        self.deadline = 0.0
        self.ready = False  # settled once: the fast path for every later request


STARTUP = _Startup()


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
    STARTUP.deadline = max(STARTUP.deadline, time.monotonic() + options.startup_wait_seconds)
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
    except Exception:
        log_once("experiment-check", "could not tell where MLflow sends traces; leaving it to MLflow")


def configure_spool(options: Options) -> None:
    """Called once when a middleware is built; never raises."""
    if not options.spool:
        return
    try:
        SPOOLER.configure(
            directory=options.spool_dir,
            tracking_uri=_mlflow.tracking_uri(),
            max_bytes=options.spool_max_bytes,
            max_age=options.spool_max_age_seconds,
            rate=options.spool_replay_per_second,
            fsync=options.spool_fsync,
        )
    except Exception:
        log_once("spool", "could not set up the spool; traces MLflow cannot take are dropped")


def startup_wait() -> float:
    """Seconds a request should still wait for the destination to be settled (0: go on).

    Also while an experiment known without a lookup (an id) is being made the active one: a
    first trace under way as MLflow switches experiments lost its nested spans (3.10)."""
    if STARTUP.ready:
        return 0.0
    if TRACKING_URI.missing_now():  # said once already; nothing to wait for
        return 0.0
    resolved = experiment_for_span() not in (UNRESOLVED, PLACEHOLDER)  # starts an attempt when due
    busy = ADOPTION.busy
    if resolved and not busy:
        STARTUP.ready = True
        return 0.0
    left = STARTUP.deadline - time.monotonic()
    if left > 0 and busy:
        return left
    if not resolved:  # out of time, or the attempt failed: no use waiting
        fate = "traced into the spool" if SPOOLER.active else "served untraced"
        log_once("not-ready", f"tracing is not ready after start-up ({tracing_status().detail}): requests "
                 f"are {fate} until it is; mlflow_ctx_mw.tracing_status() tells",
                 exc_info=False, level=logging.ERROR)  # fmt: skip
    return 0.0


def wait_until_ready(timeout: float) -> None:
    """Block (a worker thread, never an event loop) until the destination is settled, the attempt
    to settle it failed, or `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and ADOPTION.busy:
        ADOPTION.settled.wait(min(left, 0.5))


async def await_ready(timeout: float) -> None:
    """wait_until_ready for an event loop, holding no thread: a burst of first requests would
    otherwise fill the loop's default executor, which the app's own to_thread calls share."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and ADOPTION.busy:
        await asyncio.sleep(0.02)


@dataclass(frozen=True)
class TracingStatus:
    """Whether requests are traced now, into which experiment, and if not, why."""

    ready: bool
    experiment_id: str | None
    detail: str


def tracing_status() -> TracingStatus:
    """For a readiness probe: a server may take traffic before tracing can (the tracking server
    down at start-up, an experiment name not resolved yet, no tracking server configured)."""
    if TRACKING_URI.missing:
        return TracingStatus(False, None, "no MLflow tracking server configured (MLFLOW_TRACKING_URI)")
    if experiment_for_span() in (UNRESOLVED, PLACEHOLDER):
        reason = ADOPTION.failure or "still resolving"
        return TracingStatus(False, None, f"experiment from MLFLOW_EXPERIMENT_NAME not resolved: {reason}")
    try:
        experiment = _mlflow.configured_experiment() or ADOPTION.known
    except Exception:
        experiment = None
    return TracingStatus(True, experiment, "tracing")


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
