"""The private MLflow hooks in _mlflow.py still behave as we rely on (pinned version range)."""

from __future__ import annotations

import uuid

import mlflow
import pytest

from conftest import create_experiment, experiment_id
from mlflow_ctx_mw import _mlflow

pytestmark = pytest.mark.usefixtures("mlflow_server")


@pytest.fixture(scope="module", autouse=True)
def app_configured(mlflow_server: str) -> None:
    """What building a middleware does first: settle where MLflow sends traces (by environment,
    the process's experiment; nested spans would otherwise be looked up per span)."""
    from mlflow_ctx_mw import Options
    from mlflow_ctx_mw.destination import configure_destination

    configure_destination(Options())


def test_root_span_carries_fields_nests_children_and_is_renamed() -> None:
    started = _mlflow.start_root_span(
        "GET /raw/1",
        metadata={"mlflow.trace.user": "contract-user"},
        tags={"t": "1"},
        client_request_id="contract-req",
        experiment_id=experiment_id(),
    )
    assert started is not None
    span = started.span
    token = _mlflow.attach(span)
    try:
        assert mlflow.get_current_active_span().span_id == span.span_id
        with mlflow.start_span("child") as child:
            assert child.parent_id == span.span_id
        mlflow.update_current_trace(tags={"from_handler": "yes"})
    finally:
        _mlflow.detach(token)
    assert mlflow.get_current_active_span() is None
    http = {_mlflow.METHOD: "GET", _mlflow.PATH: "/raw/1", _mlflow.QUERY: "q=\u00e9"}
    _mlflow.end_span(started, name="GET /raw/{id}", attributes=http, status_code=503, error=None)
    mlflow.flush_trace_async_logging()
    trace = mlflow.get_trace(span.trace_id)
    assert trace.info.client_request_id == "contract-req"
    assert trace.info.trace_metadata["mlflow.trace.user"] == "contract-user"
    assert trace.info.tags["t"] == "1" and trace.info.tags["from_handler"] == "yes"
    assert trace.info.state == "ERROR"
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.name == "GET /raw/{id}"
    assert root.attributes[_mlflow.METHOD] == "GET" and root.attributes[_mlflow.PATH] == "/raw/1"
    assert root.attributes[_mlflow.QUERY] == "q=\u00e9"
    assert root.attributes[_mlflow.STATUS] == 503
    assert root.inputs is None and root.outputs is None  # the child had none to adopt


def _traced_request(*children: tuple[str, object, object], own: object = None):  # type: ignore[no-untyped-def]
    """A root span whose app ran `children` (name, inputs, outputs) in order; the trace read back."""
    started = _mlflow.start_root_span(
        "POST /chat",
        metadata={},
        tags={},
        client_request_id=f"io-{uuid.uuid4().hex[:8]}",
        experiment_id=experiment_id(),
    )
    assert started is not None
    token = _mlflow.attach(started.span)
    try:
        if own is not None:
            mlflow.get_current_active_span().set_inputs(own)
        for name, inputs, outputs in children:
            with mlflow.start_span(name) as child:
                if inputs is not None:
                    child.set_inputs(inputs)
                with mlflow.start_span(f"{name}-inner") as inner:  # grandchildren are never adopted
                    inner.set_inputs({"inner": name})
                    inner.set_outputs({"inner": name})
                if outputs is not None:
                    child.set_outputs(outputs)
    finally:
        _mlflow.detach(token)
    _mlflow.end_span(started, name="POST /chat", attributes={}, status_code=200, error=None)
    mlflow.flush_trace_async_logging()
    return mlflow.get_trace(started.span.trace_id)


def test_the_apps_first_request_and_last_answer_become_the_traces() -> None:
    """What the trace list previews and evaluation reads (trace.data.request/response)."""
    question = {"messages": [{"role": "user", "content": "What is MLflow?"}]}
    trace = _traced_request(
        ("retrieve", question, {"docs": ["d1"]}),
        ("no-io", None, None),
        ("generate", {"docs": ["d1"]}, "MLflow is an AI engineering platform."),
    )
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.inputs == question
    assert root.outputs == "MLflow is an AI engineering platform."
    assert root.attributes[_mlflow.STATUS] == 200
    assert "What is MLflow?" in (trace.info.request_preview or "")  # < 3.12: the JSON of it
    assert "AI engineering platform" in (trace.info.response_preview or "")


def test_inputs_the_app_set_on_the_root_are_kept() -> None:
    trace = _traced_request(("generate", {"q": "child"}, {"a": "child"}), own={"q": "own"})
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.inputs == {"q": "own"}
    assert root.outputs == {"a": "child"}


def test_a_leaked_current_span_is_never_the_parent() -> None:
    leaked = mlflow.start_span_no_context("leaked-from-elsewhere", experiment_id=experiment_id())
    token = _mlflow.attach(leaked)
    try:
        assert mlflow.get_current_active_span() is not None
        started = _mlflow.start_root_span(
            "GET /", metadata={}, tags={}, client_request_id="r2", experiment_id=experiment_id()
        )
        assert started is not None and started.span.parent_id is None
        _mlflow.end_span(started, name="GET /", attributes={}, status_code=200, error=None)
    finally:
        _mlflow.detach(token)
        leaked.end()


def test_disabled_tracing_gives_no_span() -> None:
    with mlflow.tracing.context(enabled=False) if hasattr(mlflow.tracing, "context") else _disabled():
        assert _mlflow.start_root_span("x", metadata={}, tags={}, client_request_id="r") is None


class _disabled:
    def __enter__(self) -> None:
        mlflow.tracing.disable()

    def __exit__(self, *exc: object) -> None:
        mlflow.tracing.enable()


def test_an_explicit_experiment_id_decides_where_the_trace_goes() -> None:
    """Used for an experiment named only by the environment (tests/test_destination.py)."""
    other = create_experiment(f"contract-{uuid.uuid4().hex[:8]}")
    started = _mlflow.start_root_span("/", metadata={}, tags={}, client_request_id="r3", experiment_id=other)
    assert started is not None
    _mlflow.end_span(started, name="GET /", attributes={}, status_code=200, error=None)
    mlflow.flush_trace_async_logging()
    assert mlflow.get_trace(started.span.trace_id).info.experiment_id == other
    # Set in code by the suite, or (by environment) made active once by configure_destination.
    assert _mlflow.experiment_fallback() is None


# Every private (or unexported) MLflow symbol _mlflow.py relies on: a move in MLflow fails here,
# by name, before anything subtler breaks. (module, attribute path, why we use it)
PRIVATE = [
    ("mlflow.tracing.provider", "set_span_in_context", "make the request's root span current"),
    ("mlflow.tracing.provider", "detach_span_from_context", "and take it out again"),
    ("mlflow.tracing.provider", "_MLFLOW_TRACE_USER_DESTINATION", "has the app set a destination?"),
    ("mlflow.tracing.provider", "_get_trace_exporter", "count export drops on its queue"),
    ("mlflow.tracing.trace_manager", "InMemoryTraceManager.get_instance", "set a trace's fields once"),
    ("mlflow.tracing.trace_manager", "InMemoryTraceManager.get_trace", "add the user learnt late"),
    ("mlflow.tracing.trace_manager", "_Trace.span_dict", "the root's children's inputs/outputs"),
    ("mlflow.tracing.utils", "exclude_immutable_tags", "tags MLflow lets a client set"),
    ("mlflow.tracing.export.async_export_queue", "AsyncTraceExportQueue.__init__", "count drops"),
    ("mlflow.entities.span", "NO_OP_SPAN_TRACE_ID", "a span MLflow did not record"),
    ("mlflow.tracking.fluent", "_active_experiment_id", "has the app set an experiment?"),
    ("mlflow.tracking.default_experiment", "registry.get_experiment_id", "the default, asked once"),
    ("mlflow.tracing.client", "TracingClient.get_trace", "a stored trace, or not yet (feedback)"),
    # _exporter.py: the spool's hooks
    ("mlflow.tracing.export.mlflow_v3", "MlflowV3SpanExporter._log_trace", "divert, watch, replay a trace"),
    (
        "mlflow.tracing.export.mlflow_v3",
        "MlflowV3SpanExporter._log_spans",
        "skip spans a spooled trace carries",
    ),
    ("mlflow.tracing.client", "TracingClient.start_trace", "learn that a trace was not stored"),
    ("mlflow.tracing.client", "TracingClient._upload_trace_data", "nor its spans"),
    ("mlflow.utils.rest_utils", "http_request", "one brief retry while the spool watches"),
    ("mlflow.store.tracking.rest_store", "http_request", "the same name, imported there"),
    ("mlflow.entities", "Trace.from_dict", "a spooled trace back"),
    ("mlflow.store.tracking.rest_store", "RestStore._get_server_version.cache_clear", "forget an outage"),
]


@pytest.mark.parametrize(("module", "path", "why"), PRIVATE, ids=[f"{m}.{p}" for m, p, _ in PRIVATE])
def test_private_symbols_are_where_we_use_them(module: str, path: str, why: str) -> None:
    import importlib

    from mlflow.version import IS_TRACING_SDK_ONLY

    if module == "mlflow.tracking.default_experiment" and IS_TRACING_SDK_ONLY:
        pytest.skip("the lean package has no default-experiment providers (they need PyYAML)")
    found: object = importlib.import_module(module)
    for part in path.split("."):
        if part == "span_dict":  # a dataclass field: on the class's fields, not as an attribute
            assert "span_dict" in found.__dataclass_fields__, why  # type: ignore[attr-defined]
            return
        assert hasattr(found, part), f"{module}.{path} moved ({why})"
        found = getattr(found, part)


def test_private_state_has_the_shape_we_read() -> None:
    """The trace manager's lock and cache, the exporter's queue, MLflow's drop messages."""
    import inspect
    import logging

    from mlflow.tracing.export import async_export_queue, mlflow_v3
    from mlflow.tracing.trace_manager import InMemoryTraceManager

    manager = InMemoryTraceManager.get_instance()
    assert hasattr(manager, "_lock") and hasattr(manager._traces, "popitem")  # a cachetools cache
    source = inspect.getsource(async_export_queue.AsyncTraceExportQueue)
    assert "self._queue" in source
    assert "_async_queue" in inspect.getsource(mlflow_v3.MlflowV3SpanExporter)
    # The spool's hooks: the tasks it recognises, the calls whose failures it records.
    assert "handler=self._log_trace" in inspect.getsource(mlflow_v3.MlflowV3SpanExporter)
    assert list(inspect.signature(mlflow_v3.MlflowV3SpanExporter._log_trace).parameters)[:3] == [
        "self", "trace", "prompts"
    ]  # fmt: skip
    log_trace = inspect.getsource(mlflow_v3.MlflowV3SpanExporter._log_trace)
    assert "self._client.start_trace(" in log_trace and "_upload_trace_data(" in log_trace
    # The failure warnings our filters count, logged under these names.
    assert logging.getLogger(mlflow_v3.__name__).name == "mlflow.tracing.export.mlflow_v3"
    assert "Failed to" in inspect.getsource(mlflow_v3) + inspect.getsource(async_export_queue)


def test_version_dependent_features_are_detected_as_this_mlflow_has_them() -> None:
    """What _mlflow.py decides once at import matches this MLflow (links 3.15, context 3.11)."""
    from mlflow.tracing import provider
    from packaging.version import Version

    version = Version(mlflow.__version__)
    assert (version >= Version("3.15")) == _mlflow.SUPPORTS_LINKS
    assert (version >= Version("3.11")) == (_mlflow._tracing_context is not None)
    own = getattr(provider, "get_current_otel_span", None)  # private, 3.9+; OpenTelemetry's before
    assert (version >= Version("3.9")) == (own is not None and _mlflow._current_otel_span is own)
    if version < Version("3.12"):  # MLflow's own async export, on by default from 3.12
        import os

        assert os.environ.get("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING") is not None
