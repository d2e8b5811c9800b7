"""Every use of MLflow that is not plain public API lives here, behind a contract test.

`set_span_in_context` / `detach_span_from_context` and the in-memory trace manager are private
but used by MLflow's own integrations; tests/test_mlflow_contract.py names every private symbol
used here and fails first if one moves. The supported range (pyproject.toml) is tested in CI
(`make compat`). Where an older MLflow lacks something, the difference is absorbed here once, at
import: nothing is probed per request.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import secrets
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

import mlflow
import mlflow.tracing
from mlflow.entities import SpanStatusCode
from mlflow.entities.span import NO_OP_SPAN_TRACE_ID, LiveSpan
from mlflow.tracing import provider as _provider
from mlflow.tracing.constant import SpanAttributeKey
from mlflow.tracing.provider import detach_span_from_context, set_span_in_context
from mlflow.tracing.trace_manager import InMemoryTraceManager
from mlflow.tracing.utils import exclude_immutable_tags
from opentelemetry import trace as otel_trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from mlflow_ctx_mw._logonce import log_once

# mlflow-tracing < 3.12 exports to a server other than Databricks synchronously unless asked:
# every root span's end would wait for MLflow's HTTP calls on the request path (the event loop,
# for ASGI). Turn on MLflow's own async export there, unless the app chose either way.
MLFLOW_VERSION = tuple(int(part) for part in mlflow.__version__.split(".")[:2])
if MLFLOW_VERSION < (3, 12):
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "true")

#: A caller's traceparent becomes a span link (mlflow-tracing >= 3.15); before, only the
#: searchable caller metadata is recorded.
SUPPORTS_LINKS = "links" in inspect.signature(mlflow.start_span_no_context).parameters
#: mlflow-tracing < 3.9 keeps MLflow's span in OpenTelemetry's own context.
_current_otel_span: Callable[[], Any] = getattr(
    _provider, "get_current_otel_span", otel_trace.get_current_span
)
#: mlflow.tracing.context(enabled=False) turns tracing off for one context (>= 3.11).
_tracing_context: Callable[..., Any] | None = getattr(mlflow.tracing, "context", None)
#: search_traces(locations=...) from 3.5; experiment_ids before.
_SEARCH_IN = (
    "locations" if "locations" in inspect.signature(mlflow.search_traces).parameters else "experiment_ids"
)

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
    spans: dict[str, Any]


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
    kwargs: dict[str, Any] = {"experiment_id": experiment_id}
    # A caller's traceparent becomes a span link, not a parent: a remote parent stores nothing
    # with the default batch processor and loses our metadata (measured on mlflow 3.17.2).
    if caller and SUPPORTS_LINKS:
        from mlflow.entities import Link

        kwargs["links"] = [Link(trace_id=f"tr-{caller[0]}", span_id=caller[1])]  # type: ignore[abstract]
    # A leaked current span would become the parent: start from an empty context then.
    span = start(name, **kwargs) if not _inside_a_span() else contextvars.Context().run(start, name, **kwargs)
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
    current = _current_otel_span()
    return current is not None and not isinstance(current, NonRecordingSpan)


def attach(span: LiveSpan) -> Any:
    return set_span_in_context(span)


def detach(token: Any) -> None:
    detach_span_from_context(token)


# Before mlflow.tracing.context: an unsampled parent, which OpenTelemetry's default parent-based
# sampler follows, so spans started under it are not recorded (MLflow makes them no-op spans).
_UNSAMPLED = SimpleNamespace(
    _span=NonRecordingSpan(
        SpanContext(
            trace_id=secrets.randbits(128) | 1,
            span_id=secrets.randbits(64) | 1,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
        )
    )
)


def suppress() -> Callable[[], None]:
    """Tracing off in this context (a sampled-out request: nested spans are dropped too).

    Returns the function that turns it back on, to be called in the same context.
    """
    if _tracing_context is not None:
        manager = _tracing_context(enabled=False)
        manager.__enter__()
        return lambda: manager.__exit__(None, None, None)
    token = set_span_in_context(_UNSAMPLED)  # type: ignore[arg-type]
    return lambda: detach_span_from_context(token)


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
    span = root.span
    otel: Any = span._span  # the SDK's Span (typed by MLflow as the read-only view)
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


def _adopt_app_io(root: Any, spans: dict[str, Any], values: dict[str, str]) -> None:
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
    fluent = _fluent()
    if fluent._active_experiment_id or _user_destination() is not None:
        return None
    env = "MLFLOW_EXPERIMENT_NAME" in os.environ or "MLFLOW_EXPERIMENT_ID" in os.environ
    if mlflow.active_run() is not None:
        return None
    return "env" if env else "default"


#: Modules MLflow imports for every trace, span or HTTP call, which the lean package does not ship
#: (mlflow.pyfunc, mlflow.agent) or an app server does not have (IPython for notebook display;
#: Databricks' runtime and pyspark, probed on each call to the tracking server). Python caches a
#: module once imported, never a failed import: each attempt scans sys.path again (measured 7
#: per request on the lean package, ~0.3 ms; ~6 per request on the full one, most on the
#: exporter's threads).
_PER_TRACE_IMPORTS = (
    "mlflow.pyfunc.context",
    "mlflow.agent.hint",
    "IPython",
    "dbruntime.databricks_repl_context",
    "pyspark",
    "pyspark.sql",
)


def cache_missing_imports() -> list[str]:
    """Make MLflow's per-trace imports of modules absent here fail at once: a None entry in
    sys.modules, which the import system documents as "known missing". Returns them."""
    import importlib.util
    import sys

    missing = []
    for name in _PER_TRACE_IMPORTS:
        if name in sys.modules:
            continue
        parent = name.rsplit(".", 1)[0]
        try:  # the parent's spec, never the module itself: nothing is imported here
            absent = importlib.util.find_spec(parent) is None or (
                parent != name and importlib.util.find_spec(name) is None
            )
        except (ImportError, ValueError):
            absent = True
        if absent:
            sys.modules[name] = None  # type: ignore[assignment]
            missing.append(name)
    return missing


def tracking_uri() -> str:
    """Where traces go; "" when MLflow cannot say (the lean package without a URI)."""
    try:
        return str(mlflow.get_tracking_uri())
    except Exception:
        return ""


def tracking_uri_usable() -> bool:
    """False when traces cannot go anywhere: the lean package talks only to a tracking server,
    and with no MLFLOW_TRACKING_URI it falls back to a local store it cannot open (or fails to
    say where it tracks at all)."""
    from mlflow.version import IS_TRACING_SDK_ONLY

    try:
        uri = mlflow.get_tracking_uri()
    except Exception:
        return False
    return not IS_TRACING_SDK_ONLY or uri.split(":", 1)[0] in ("http", "https", "databricks")


def configured_experiment() -> str | None:
    """The experiment the app set in code (set_experiment, a destination, an active run)."""
    fluent = _fluent()
    if fluent._active_experiment_id:
        return str(fluent._active_experiment_id)
    if (destination := _user_destination()) is not None:
        found = getattr(destination, "experiment_id", None)
        return str(found) if found else None
    run = mlflow.active_run()
    return str(run.info.experiment_id) if run is not None else None


@functools.cache
def default_experiment_id() -> str | None:
    """MLflow's default experiment for this process ("0" outside Databricks), found once.

    Cached for the process, failures included: a web server does not move into a Databricks
    notebook, and a later `set_tracking_uri("databricks")` without an experiment is not a setup
    traces can land from. The lean package's providers need PyYAML, which it does not install:
    then, as MLflow's own registry would say outside Databricks, "0" (a Databricks URI has no
    default experiment: None leaves it to MLflow).
    """
    try:
        from mlflow.tracking.default_experiment import registry

        return str(registry.get_experiment_id())
    except Exception:
        from mlflow.utils.uri import is_databricks_uri

        try:
            databricks = is_databricks_uri(mlflow.get_tracking_uri())
        except Exception:  # the lean package with no MLFLOW_TRACKING_URI cannot even say
            databricks = False
        return None if databricks else "0"


@functools.cache
def _fluent() -> Any:
    from mlflow.tracking import fluent

    return fluent


def _user_destination() -> Any:
    """The destination set by `mlflow.tracing.set_destination`, if any (a registry from 3.4 on)."""
    destination = _provider._MLFLOW_TRACE_USER_DESTINATION
    return destination.get() if hasattr(destination, "get") else destination


def experiment_without_lookup(fallback: str) -> str | None:
    """The experiment MLflow would find, when that takes no network call (an _ID, the default)."""
    if fallback == "default":
        return default_experiment_id()
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return None
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or None


def adopt_experiment(fallback: str) -> str | None:
    """Make the experiment MLflow would look up per trace the process's active one, with
    `mlflow.set_experiment` (public, MLflow's own client and credentials; it creates a named
    experiment that is missing, as MLflow's lookup does). Unless the app set one meanwhile.

    MLflow's own environment lookup cannot run in the lean package (it needs MlflowClient, which
    that package leaves out); set_experiment can.
    """
    if (chosen := configured_experiment()) is not None:
        return chosen
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") if fallback == "env" else None
    if name:
        experiment = mlflow.set_experiment(experiment_name=name)
        wanted = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if wanted and wanted != experiment.experiment_id:
            log_once("experiment-mismatch", f"MLFLOW_EXPERIMENT_ID={wanted} is not the id of "
                     f"MLFLOW_EXPERIMENT_NAME={name!r} ({experiment.experiment_id}): using the name's",
                     exc_info=False)  # fmt: skip
        return str(experiment.experiment_id)
    experiment_id = experiment_without_lookup(fallback)
    if experiment_id is None:  # a Databricks URI with no experiment: nothing to adopt
        return None
    return str(mlflow.set_experiment(experiment_id=experiment_id).experiment_id)


def stored_trace(trace_id: str) -> Any:
    """The trace as the tracking server holds it, or None until all of it is stored (MLflow
    answers RESOURCE_DOES_NOT_EXIST for a trace not exported yet, and "missing" or "corrupted"
    span data for one whose info is stored and whose spans are still being written).
    Other failures (server down) raise. `mlflow.get_trace` would say None to both, with a
    warning each time."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracing.client import TracingClient

    try:
        return TracingClient().get_trace(trace_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            exc.error_code == "BAD_REQUEST" and "span data" in exc.message
        ):
            return None
        raise


def traces_by_client_request_id(
    client_request_id: str, experiment_id: str | None, user: str | None
) -> list[str]:
    """Up to two ids of traces with this client request id (and user, when given).

    The caller validated both as filter-safe (no quotes, backticks, backslashes or spaces; MLflow
    filter strings have no escapes); checked again here, as this is where they meet the filter.
    """
    clauses = [("attributes.client_request_id", client_request_id)]
    if user is not None:
        clauses.append(("metadata.`mlflow.trace.user`", user))
    for _, value in clauses:
        if not value or any(char in value for char in "'\"`\\ "):
            raise ValueError("not a filter-safe value")
    traces = mlflow.search_traces(
        filter_string=" AND ".join(f"{key} = '{value}'" for key, value in clauses),
        max_results=2,
        include_spans=False,
        return_type="list",
        **{_SEARCH_IN: [experiment_id] if experiment_id else None},
    )
    return [trace.info.trace_id for trace in traces]


def own_assessment(info: Any, name: str, source_id: str) -> str | None:
    """The id of the valid HUMAN assessment this source gave under this name, if any."""
    for assessment in info.assessments or ():
        source = assessment.source
        if (
            assessment.name == name
            and source is not None
            and source.source_type == "HUMAN"
            and source.source_id == source_id
            and getattr(assessment, "valid", True) is not False
        ):
            return str(assessment.assessment_id)
    return None


def write_assessment(
    trace_id: str,
    existing_id: str | None,
    *,
    kind: str,
    name: str,
    value: Any,
    source_id: str,
    rationale: str | None,
    metadata: dict[str, Any] | None,
) -> str:
    """Log feedback or an expectation with a HUMAN source, or update the one given before."""
    from mlflow.entities import AssessmentSource, Expectation, Feedback

    source = AssessmentSource(source_type="HUMAN", source_id=source_id)
    assessment: Any
    if kind == "expectation":
        assessment = Expectation(name=name, value=value, source=source, metadata=metadata)
    else:
        assessment = Feedback(name=name, value=value, source=source, rationale=rationale, metadata=metadata)
    if existing_id is not None:
        return str(mlflow.update_assessment(trace_id, existing_id, assessment).assessment_id)
    return str(mlflow.log_assessment(trace_id, assessment).assessment_id)


def flush_export() -> None:
    """Export what the batch processor holds now (public API; blocks until written)."""
    mlflow.flush_trace_async_logging()


def traceparent(span: LiveSpan) -> str:
    """The W3C traceparent naming `span`, for calls this request makes to other services."""
    context = span._span.get_span_context()
    assert context is not None  # a recording span always has one
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"


def set_trace_metadata(span: LiveSpan, metadata: dict[str, str | None]) -> None:
    """Set (None: remove) metadata of a live trace (still in memory, not yet exported)."""
    with InMemoryTraceManager.get_instance().get_trace(span.trace_id) as trace:
        if trace is not None:
            for key, value in metadata.items():
                if value is None:
                    trace.info.trace_metadata.pop(key, None)
                else:
                    trace.info.trace_metadata[key] = value
