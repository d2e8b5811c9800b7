"""MLflow's trace exporter, watched: its drops counted, and what it cannot deliver handed to the
spool. Like _mlflow.py, every private symbol used here is named in tests/test_mlflow_contract.py.

MLflow exports a finished trace as two tasks on its async queue, `_log_spans` (the spans, to a
SQL-backed server) and `_log_trace` (the trace info, and the spans as an artifact where the server
did not take them), both on `MlflowV3SpanExporter` from 3.4 to today. The spool hooks in around
`_log_trace`, which holds the whole trace: it may divert the trace to disk instead (the server is
known to be down), learns whether MLflow's calls failed (their exceptions are recorded on the way
out, since `_log_trace` swallows them), and, while watching, makes MLflow's HTTP calls give up
after one retry instead of retrying for minutes: the spool is the retry, and a worker stuck in
MLflow's backoff would hold the trace where a SIGTERM loses it.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from mlflow.entities import Trace
from mlflow.exceptions import MlflowException
from mlflow.tracing.client import TracingClient
from mlflow.tracing.export.async_export_queue import AsyncTraceExportQueue
from mlflow.tracing.export.mlflow_v3 import MlflowV3SpanExporter
from mlflow.tracing.provider import _get_trace_exporter
from mlflow.tracing.trace_manager import InMemoryTraceManager

__all__ = [
    "SpoolHooks",
    "backlog",
    "deliver_trace",
    "drain_queue",
    "install_drop_hooks",
    "install_spool_hooks",
    "is_transient",
    "parse_trace",
    "retry_span_logging",
    "watched",
]

#: While watching, MLflow's HTTP calls: one retry, half a second apart, 30 s at most each.
WATCHED_RETRIES = 1
WATCHED_BACKOFF = 0.5
WATCHED_TIMEOUT = 30.0
#: Modules that call MLflow's http_request by a name of their own (imported, or defined there).
_HTTP_MODULES = (
    "mlflow.utils.rest_utils",
    "mlflow.store.tracking.rest_store",
    "mlflow.store.artifact.http_artifact_repo",
)


class SpoolHooks(Protocol):
    def divert(self, trace: Trace) -> bool:
        """Spool this trace instead of exporting it now; True if taken."""

    def skip_spans(self, experiment_id: str) -> bool:
        """Leave these spans to their trace (it is spooled whole)."""

    def begin(self, trace: Trace) -> None: ...

    def end(self, trace: Trace, failure: BaseException | None) -> None: ...

    def overflow(self, trace: Trace) -> bool:
        """MLflow's queue is full: take the trace instead of dropping it; True if taken."""

    def spans_failed(self, trace_ids: set[str], failure: BaseException) -> None:
        """Some spans of these traces were not stored (their trace info may be)."""


class _Call(threading.local):
    watching = False
    failure: BaseException | None = None


_CALL = _Call()
_hooks: SpoolHooks | None = None
_originals: dict[str, Any] = {}


@contextmanager
def watched() -> Iterator[_Call]:
    """MLflow's calls in this block retry briefly and record their first failure."""
    before = _CALL.watching, _CALL.failure
    _CALL.watching, _CALL.failure = True, None
    try:
        yield _CALL
    finally:
        _CALL.watching, _CALL.failure = before


def is_transient(error: BaseException) -> bool:
    """Worth trying again later: the server unreachable, failing, overloaded, or refusing our
    credentials (which an operator fixes); MLflow reports each as an MlflowException. Not a
    request it will always refuse (4xx, 501 Not Implemented), nor a bug on our side of the wire
    (any other error)."""
    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return (status >= 500 and status != 501) or status in (401, 403, 408, 429)


def _record_failure(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            if _CALL.watching and _CALL.failure is None:
                _CALL.failure = exc
            raise

    recorded._mlflow_ctx_mw = True  # type: ignore[attr-defined]
    return recorded


def _brief(http_request: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(http_request)
    def briefly(*args: Any, **kwargs: Any) -> Any:
        if _CALL.watching:
            retries = kwargs.get("max_retries")
            kwargs["max_retries"] = WATCHED_RETRIES if retries is None else min(retries, WATCHED_RETRIES)
            kwargs["backoff_factor"] = min(kwargs.get("backoff_factor") or WATCHED_BACKOFF, WATCHED_BACKOFF)
            kwargs["timeout"] = min(kwargs.get("timeout") or WATCHED_TIMEOUT, WATCHED_TIMEOUT)
        return http_request(*args, **kwargs)

    briefly._mlflow_ctx_mw = True  # type: ignore[attr-defined]
    return briefly


def install_spool_hooks(hooks: SpoolHooks) -> None:
    """Route MLflow's exporter through `hooks` (once per process; later calls swap the hooks)."""
    global _hooks
    _hooks = hooks
    if _originals:
        return
    import importlib

    _originals["log_trace"] = MlflowV3SpanExporter._log_trace
    _originals["log_spans"] = MlflowV3SpanExporter._log_spans
    for name in ("start_trace", "_upload_trace_data", "log_spans"):
        setattr(TracingClient, name, _record_failure(getattr(TracingClient, name)))
    for module_name in _HTTP_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "http_request"):
            module.http_request = _brief(module.http_request)  # type: ignore[attr-defined]

    def log_trace(self: Any, trace: Trace, *args: Any, **kwargs: Any) -> None:
        hooks = _hooks
        if hooks is None or type(self) is not MlflowV3SpanExporter:
            return _originals["log_trace"](self, trace, *args, **kwargs)  # type: ignore[no-any-return]
        if hooks.divert(trace):
            return None
        hooks.begin(trace)
        failure: BaseException | None = None
        try:
            with watched() as call:
                _originals["log_trace"](self, trace, *args, **kwargs)
                failure = call.failure
        finally:
            hooks.end(trace, failure)
        return None

    def log_spans(self: Any, experiment_id: str, *args: Any, **kwargs: Any) -> None:
        hooks = _hooks
        if hooks is not None and type(self) is MlflowV3SpanExporter:
            if hooks.skip_spans(experiment_id):
                return None
            with watched() as call:  # MLflow swallows the failure: the trace must not be taken as whole
                _originals["log_spans"](self, experiment_id, *args, **kwargs)
                if call.failure is not None:
                    spans = args[0] if args else kwargs.get("spans", [])
                    hooks.spans_failed({span.trace_id for span in spans}, call.failure)
            return None
        return _originals["log_spans"](self, experiment_id, *args, **kwargs)  # type: ignore[no-any-return]

    MlflowV3SpanExporter._log_trace = functools.wraps(_originals["log_trace"])(log_trace)  # type: ignore[method-assign]
    MlflowV3SpanExporter._log_spans = functools.wraps(_originals["log_spans"])(log_spans)  # type: ignore[method-assign]


def _exporter() -> MlflowV3SpanExporter:
    exporter = _get_trace_exporter()
    if type(exporter) is MlflowV3SpanExporter:
        return exporter
    if exporter is None:  # nothing traced in this process yet: a spare one for replays
        spare = _originals.get("spare")
        if spare is None:
            spare = _originals["spare"] = MlflowV3SpanExporter()
        return spare
    raise RuntimeError(f"traces go to {type(exporter).__name__}, not an MLflow tracking server")


def parse_trace(data: Any) -> Trace:
    """A spooled trace (`Trace.to_dict()`) back as MLflow's entity; raises if it is not one."""
    return Trace.from_dict(data)


def deliver_trace(trace: Trace) -> BaseException | None:
    """Send a spooled trace as MLflow's exporter would; the failure, if any. Safe to repeat:
    the server keeps one trace per id and one span per span id."""
    exporter = _exporter()
    retry_span_logging(exporter)
    with watched() as call:
        if getattr(exporter, "_store_supports_log_spans", True):
            _originals["log_spans"](exporter, trace.info.experiment_id, trace.data.spans)
        if call.failure is not None and is_transient(call.failure):
            return call.failure  # down: the rest would fail too, or store the trace without spans
    with watched() as call:  # a store that takes no spans (NotImplementedError, 501): artifacts
        _originals["log_trace"](exporter, trace, [])
        return call.failure


def retry_span_logging(exporter: Any = None) -> None:
    """Undo what one unreachable moment does to MLflow for the rest of the process: its server
    version probe caches the failure (lru_cache), `log_spans` then raises NotImplementedError,
    and the exporter stops sending spans to the server's store for good. Its traces' spans then
    go to artifacts; worse, a trace whose info the store already created from an earlier batch
    of its spans is left without the rest (never complete, never found). If the server really
    cannot take spans, MLflow finds out again on the next call."""
    exporter = exporter if exporter is not None else _get_trace_exporter()
    if getattr(exporter, "_store_supports_log_spans", True) is not False:
        return
    exporter._store_supports_log_spans = True
    try:
        from mlflow.store.tracking.rest_store import RestStore

        RestStore._get_server_version.cache_clear()
    except (ImportError, AttributeError):
        pass


def backlog() -> float:
    """How full MLflow's export queue is (0-1): above half, the server is behind."""
    export_queue = getattr(getattr(_get_trace_exporter(), "_async_queue", None), "_queue", None)
    if not isinstance(export_queue, queue.Queue) or export_queue.maxsize <= 0:
        return 0.0
    return export_queue.qsize() / export_queue.maxsize


def drain_queue() -> list[Trace]:
    """Take the traces out of MLflow's export queue (the server is down: the spool keeps them;
    their spans tasks go too, the spool has every span)."""
    exporter = _get_trace_exporter()
    export_queue = getattr(getattr(exporter, "_async_queue", None), "_queue", None)
    if not isinstance(export_queue, queue.Queue):
        return []
    with export_queue.mutex:
        tasks = list(export_queue.queue)
        export_queue.queue.clear()
        export_queue.unfinished_tasks -= len(tasks)
        if export_queue.unfinished_tasks <= 0:
            export_queue.unfinished_tasks = 0
            export_queue.all_tasks_done.notify_all()
        export_queue.not_full.notify_all()
    return [trace for task in tasks if (trace := _trace_of(task)) is not None]


def _trace_of(task: Any) -> Trace | None:
    handler = getattr(task, "handler", None)
    if getattr(handler, "__name__", None) != "_log_trace":
        return None
    args = getattr(task, "args", ())
    return args[0] if args and isinstance(args[0], Trace) else None


def install_drop_hooks(
    on_export_drop: Any, on_span_drop: Any, on_export_failure: Any, on_trace_evicted: Any
) -> None:
    """Call back on every export MLflow discards (its queues are full); idempotent.

    MLflow's async export queue drops a task when full and warns at most once per 30 s; OTel's
    batch span processor drops a span when its queue is full and warns per span; MLflow's
    in-memory trace buffer (a cachetools cache) evicts a trace silently when it holds
    MLFLOW_TRACE_BUFFER_MAX_SIZE. The first and last are counted exactly by giving the queue and
    the cache a counting class, the second by a log filter. With the spool on, a trace task the
    full queue refuses is spooled instead (not a drop), and its spans task is left to it.
    """

    class CountingQueue(queue.Queue):  # type: ignore[type-arg]
        def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
            try:
                super().put(item, block, timeout)
            except queue.Full:
                hooks = _hooks
                if hooks is None or ((trace := _trace_of(item)) is not None and not hooks.overflow(trace)):
                    on_export_drop()
                raise

    def count_queue(export_queue: Any) -> None:
        inner = getattr(export_queue, "_queue", None)
        if type(inner) is queue.Queue:
            inner.__class__ = CountingQueue

    if not getattr(AsyncTraceExportQueue.__init__, "_mlflow_ctx_mw", False):
        original_init: Any = AsyncTraceExportQueue.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            count_queue(self)

        init._mlflow_ctx_mw = True  # type: ignore[attr-defined]
        AsyncTraceExportQueue.__init__ = init  # type: ignore[method-assign]

    exporter = _get_trace_exporter()
    if exporter is not None and getattr(exporter, "_async_queue", None) is not None:
        count_queue(exporter._async_queue)

    class SpanDrops(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage().startswith("Queue full, dropping"):
                on_span_drop()
                return False  # replaced by our rate-limited warning
            return True

    otel_logger = logging.getLogger("opentelemetry.sdk._shared_internal")
    if not any(type(f).__name__ == "SpanDrops" for f in otel_logger.filters):
        otel_logger.addFilter(SpanDrops())

    class ExportFailures(logging.Filter):
        """A down server makes MLflow warn once per trace: count them, let the caller decide."""

        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno >= logging.WARNING and record.getMessage().startswith("Failed to"):
                return bool(on_export_failure())
            return True

    for name in ("mlflow.tracing.export.mlflow_v3", "mlflow.tracing.export.async_export_queue"):
        export_logger = logging.getLogger(name)
        if not any(type(f).__name__ == "ExportFailures" for f in export_logger.filters):
            export_logger.addFilter(ExportFailures())

    buffer = InMemoryTraceManager.get_instance()._traces
    if not getattr(type(buffer), "_mlflow_ctx_mw", False):

        class CountingCache(type(buffer)):  # type: ignore[misc]
            """Cache.__setitem__ calls popitem() only to make room: each call is an eviction."""

            __slots__ = ()
            _mlflow_ctx_mw = True

            def popitem(self) -> Any:
                item = super().popitem()
                on_trace_evicted()
                return item

        buffer.__class__ = CountingCache
