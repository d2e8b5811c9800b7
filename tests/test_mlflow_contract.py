"""The private MLflow hooks in _mlflow.py still behave as we rely on (pinned version range)."""

from __future__ import annotations

import uuid

import mlflow
import pytest

from mlflow_ctx_mw import _mlflow

pytestmark = pytest.mark.usefixtures("mlflow_server")


def test_root_span_carries_fields_nests_children_and_is_renamed() -> None:
    started = _mlflow.start_root_span(
        "GET /raw/1",
        metadata={"mlflow.trace.user": "contract-user"},
        tags={"t": "1"},
        client_request_id="contract-req",
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
        "POST /chat", metadata={}, tags={}, client_request_id=f"io-{uuid.uuid4().hex[:8]}"
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
    assert trace.info.request_preview == "What is MLflow?"
    assert "AI engineering platform" in (trace.info.response_preview or "")


def test_inputs_the_app_set_on_the_root_are_kept() -> None:
    trace = _traced_request(("generate", {"q": "child"}, {"a": "child"}), own={"q": "own"})
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.inputs == {"q": "own"}
    assert root.outputs == {"a": "child"}


def test_a_leaked_current_span_is_never_the_parent() -> None:
    with mlflow.start_span("leaked-from-elsewhere"):
        started = _mlflow.start_root_span("GET /", metadata={}, tags={}, client_request_id="r2")
        assert started is not None and started.span.parent_id is None
        _mlflow.end_span(started, name="GET /", attributes={}, status_code=200, error=None)


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
    other = mlflow.create_experiment(f"contract-{uuid.uuid4().hex[:8]}")
    started = _mlflow.start_root_span("/", metadata={}, tags={}, client_request_id="r3", experiment_id=other)
    assert started is not None
    _mlflow.end_span(started, name="GET /", attributes={}, status_code=200, error=None)
    mlflow.flush_trace_async_logging()
    assert mlflow.get_trace(started.span.trace_id).info.experiment_id == other
    assert _mlflow.experiment_fallback() is None  # the suite has set an experiment in this process
