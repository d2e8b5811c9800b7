"""Every use of MLflow that is not plain public API lives here, behind a contract test.

`set_span_in_context` / `detach_span_from_context` and the in-memory trace manager are private
but used by MLflow's own integrations; the supported version range is pinned in pyproject.toml
and tests/test_mlflow_contract.py fails first if they move.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
from typing import Any, NamedTuple

import mlflow
from mlflow.entities import Link, SpanStatusCode
from mlflow.entities.span import NO_OP_SPAN_TRACE_ID, LiveSpan
from mlflow.tracing.constant import SpanAttributeKey
from mlflow.tracing.provider import detach_span_from_context, get_current_otel_span, set_span_in_context
from mlflow.tracing.trace_manager import InMemoryTraceManager
from mlflow.tracing.utils import exclude_immutable_tags
from opentelemetry.trace import NonRecordingSpan

__all__ = [
    "LiveSpan",
    "attach",
    "detach",
    "end_span",
    "set_experiment_destination",
    "start_root_span",
]


#: HTTP facts go to root span attributes (OpenTelemetry's semantic-convention names), so the
#: span's inputs and outputs, which MLflow shows as the trace's request and response, stay the app's.
METHOD = "http.request.method"
PATH = "url.path"
QUERY = "url.query"
STATUS = "http.response.status_code"
DISCONNECTED = "http.client_disconnected"
_INPUTS = SpanAttributeKey.INPUTS
_OUTPUTS = SpanAttributeKey.OUTPUTS
_json = json.JSONEncoder().encode  # the default encoder, built once (dumps() with options is not)


class Root(NamedTuple):
    span: LiveSpan
    #: The trace's spans as MLflow registers them (span id -> span); read at the end, never written.
    spans: dict[str, LiveSpan]


def start_root_span(
    name: str,
    *,
    metadata: dict[str, str],
    tags: dict[str, str],
    client_request_id: str,
    caller: tuple[str, str] | None = None,
    experiment_id: str | None = None,
) -> Root | None:
    """A recording root span with its trace fields set in one go, or None (sampled out, disabled).

    MLflow parents a "detached" span on whatever span is current. A request must never join a
    stale trace (a span leaked by other code), so then it starts in an empty context instead.
    """
    start = mlflow.start_span_no_context
    # A caller's traceparent becomes a span link, not a parent: a remote parent stores nothing
    # with the default batch processor and loses our metadata (measured on mlflow 3.17.2).
    links = [Link(trace_id=f"tr-{caller[0]}", span_id=caller[1])] if caller else None
    if not _inside_a_span():
        span = start(name, links=links, experiment_id=experiment_id)
    else:
        span = contextvars.Context().run(start, name, links=links, experiment_id=experiment_id)
    if span.trace_id == NO_OP_SPAN_TRACE_ID:
        return None
    # One trace lookup for all fields (start_span_no_context would take the lock once per kind),
    # under the manager's lock as its get_trace() does, minus the generator context manager.
    manager = InMemoryTraceManager.get_instance()
    with manager._lock:
        trace = manager._traces.get(span.trace_id)
        if trace is None:
            return Root(span, {})
        trace.info.client_request_id = client_request_id
        trace.info.trace_metadata.update(metadata)
        if tags:
            trace.info.tags.update(exclude_immutable_tags(tags))
        return Root(span, trace.span_dict)


def _inside_a_span() -> bool:
    """mlflow.get_current_active_span() is not None, without building the LiveSpan it returns."""
    current = get_current_otel_span()
    return current is not None and not isinstance(current, NonRecordingSpan)


def attach(span: LiveSpan) -> Any:
    return set_span_in_context(span)


def detach(token: Any) -> None:
    detach_span_from_context(token)


def suppress() -> Any:
    """Tracing off in this context (a sampled-out request: nested spans are dropped too)."""
    manager = mlflow.tracing.context(enabled=False)
    manager.__enter__()
    return manager


def unsuppress(token: Any) -> None:
    token.__exit__(None, None, None)


def end_span(
    root: Root,
    *,
    name: str,
    attributes: dict[str, str],
    status_code: int | None,
    error: BaseException | None,
    disconnected: bool = False,
) -> None:
    """End the root span, setting all its attributes in one call (the SDK locks per call)."""
    span, otel = root.span, root.span._span
    otel.update_name(name)
    # MLflow stores a JSON value per attribute (LiveSpan.set_attribute): ours are str and int.
    values = {key: _json(value) for key, value in attributes.items()}
    if status_code is not None:
        values[STATUS] = str(status_code)
        if disconnected:
            values[DISCONNECTED] = "true"
    if len(root.spans) > 1:  # the app made spans of its own
        _adopt_app_io(otel, root.spans, values)
    otel.set_attributes(values)
    if error is not None:
        span.record_exception(error if isinstance(error, Exception) else repr(error))
    failed = error is not None or (status_code is not None and status_code >= 500)
    span.end(status=SpanStatusCode.ERROR if failed else SpanStatusCode.OK)


def _adopt_app_io(root: Any, spans: dict[str, LiveSpan], values: dict[str, str]) -> None:
    """The app's request and answer become the trace's: the inputs of the root's first child that
    has some and the outputs of its last, unless the app set the root's own. MLflow previews the
    root span's inputs/outputs in the trace list and evaluation reads them (`trace.data.request`):
    this is what `@mlflow.trace` on the handler would show without the middleware."""
    own = root.attributes
    if _INPUTS in own and _OUTPUTS in own:
        return
    root_id = root.context.span_id
    children = [
        child._span
        for child in list(spans.values())  # a copy: other threads may still register spans
        if child._span.parent is not None and child._span.parent.span_id == root_id
    ]
    if _INPUTS not in own and (having := [c for c in children if _INPUTS in c.attributes]):
        values[_INPUTS] = min(having, key=lambda c: c.start_time or 0).attributes[_INPUTS]
    if _OUTPUTS not in own and (having := [c for c in children if _OUTPUTS in c.attributes]):
        values[_OUTPUTS] = max(having, key=lambda c: c.end_time or 0).attributes[_OUTPUTS]


def set_experiment_destination(experiment_id: str) -> None:
    """Export to this experiment; makes no network call (the slim package needs it at start-up)."""
    from mlflow.entities.trace_location import MlflowExperimentLocation
    from mlflow.tracing import set_destination

    set_destination(MlflowExperimentLocation(experiment_id=experiment_id))


def experiment_fallback() -> str | None:
    """Which last resort MLflow would take to find each new trace's experiment, if any.

    None: an experiment, trace destination or active run is set (its cheap path). "env":
    MLFLOW_EXPERIMENT_NAME / _ID, looked up over HTTP per trace. "default": its default-experiment
    providers, which try to import Databricks' and IPython's modules per trace (7 failed imports,
    0.3-0.4 ms). Runs per request: the common case (an experiment set) returns at the first check.
    """
    fluent, destination = _experiment_state()
    if fluent._active_experiment_id or destination.get() is not None:
        return None
    env = "MLFLOW_EXPERIMENT_NAME" in os.environ or "MLFLOW_EXPERIMENT_ID" in os.environ
    if mlflow.active_run() is not None:
        return None
    return "env" if env else "default"


@functools.cache
def default_experiment_id() -> str | None:
    """MLflow's default experiment for this process ("0" outside Databricks), found once.

    Cached for the process: a web server does not move into a Databricks notebook, and a later
    `set_tracking_uri("databricks")` without an experiment is not a setup traces can land from.
    """
    from mlflow.tracking.default_experiment import registry

    return registry.get_experiment_id()


@functools.cache
def _experiment_state() -> tuple[Any, Any]:
    from mlflow.tracing.provider import _MLFLOW_TRACE_USER_DESTINATION
    from mlflow.tracking import fluent

    return fluent, _MLFLOW_TRACE_USER_DESTINATION


def resolve_env_experiment() -> str | None:
    """The id MLflow would resolve per trace (it creates a named experiment that is missing)."""
    from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
    from mlflow.tracking.fluent import _get_experiment_id_from_env

    if MLFLOW_EXPERIMENT_NAME.get() is None:
        return MLFLOW_EXPERIMENT_ID.get()  # an id needs no lookup (MLflow only checks it exists)
    return _get_experiment_id_from_env()  # type: ignore[no-any-return]


def find_traces_by_client_request_id(client_request_id: str, experiment_id: str | None) -> list[str]:
    """Up to two trace ids with this client request id (the caller validated it as filter-safe)."""
    if "'" in client_request_id or "\\" in client_request_id:
        raise ValueError("client_request_id is not filter-safe")
    traces = mlflow.search_traces(
        locations=[experiment_id] if experiment_id else None,
        filter_string=f"attributes.client_request_id = '{client_request_id}'",
        max_results=2,
        include_spans=False,
        return_type="list",
    )
    return [trace.info.trace_id for trace in traces]


def log_assessment(
    kind: str,
    *,
    trace_id: str,
    name: str,
    value: Any,
    source_id: str,
    rationale: str | None,
    metadata: dict[str, Any] | None,
) -> str | None:
    """Log feedback or an expectation with a HUMAN source; None if the trace does not exist (yet)."""
    from mlflow.entities import AssessmentSource
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    source = AssessmentSource(source_type="HUMAN", source_id=source_id)
    try:
        if kind == "expectation":
            assessment = mlflow.log_expectation(
                trace_id=trace_id, name=name, value=value, source=source, metadata=metadata
            )
        else:
            assessment = mlflow.log_feedback(
                trace_id=trace_id,
                name=name,
                value=value,
                source=source,
                rationale=rationale,
                metadata=metadata,
            )
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    return str(assessment.assessment_id)


def flush_export() -> None:
    """Export what the batch processor holds now (public API; blocks until written)."""
    mlflow.flush_trace_async_logging()


def install_drop_hooks(
    on_export_drop: Any, on_span_drop: Any, on_export_failure: Any, on_trace_evicted: Any
) -> None:
    """Call back on every export MLflow discards (its queues are full); idempotent.

    MLflow's async export queue drops a task when full and warns at most once per 30 s; OTel's
    batch span processor drops a span when its queue is full and warns per span; MLflow's
    in-memory trace buffer (a cachetools cache) evicts a trace silently when it holds
    MLFLOW_TRACE_BUFFER_MAX_SIZE. The first and last are counted exactly by giving the queue and
    the cache a counting class, the second by a log filter.
    """
    import logging
    import queue

    from mlflow.tracing.export.async_export_queue import AsyncTraceExportQueue

    class CountingQueue(queue.Queue):  # type: ignore[type-arg]
        def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
            try:
                super().put(item, block, timeout)
            except queue.Full:
                on_export_drop()
                raise

    def count_queue(export_queue: Any) -> None:
        inner = getattr(export_queue, "_queue", None)
        if type(inner) is queue.Queue:
            inner.__class__ = CountingQueue

    if not getattr(AsyncTraceExportQueue.__init__, "_mlflow_ctx_mw", False):
        original_init = AsyncTraceExportQueue.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            count_queue(self)

        init._mlflow_ctx_mw = True  # type: ignore[attr-defined]
        AsyncTraceExportQueue.__init__ = init  # type: ignore[method-assign]

    from mlflow.tracing.provider import _get_trace_exporter

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


def traceparent(span: LiveSpan) -> str:
    """The W3C traceparent naming `span`, for calls this request makes to other services."""
    context = span._span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"


def set_trace_metadata(span: LiveSpan, metadata: dict[str, str]) -> None:
    """Add metadata to a live trace (it is still in memory, not yet exported)."""
    with InMemoryTraceManager.get_instance().get_trace(span.trace_id) as trace:
        if trace is not None:
            trace.info.trace_metadata.update(metadata)
