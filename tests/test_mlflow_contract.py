"""The private MLflow hooks in _mlflow.py still behave as we rely on (pinned version range)."""

from __future__ import annotations

import uuid

import mlflow
import pytest

from mlflow_ctx_mw import _mlflow

pytestmark = pytest.mark.usefixtures("mlflow_server")


def test_root_span_carries_fields_nests_children_and_is_renamed() -> None:
    span = _mlflow.start_root_span(
        "GET /raw/1",
        inputs={"method": "GET"},
        metadata={"mlflow.trace.user": "contract-user"},
        tags={"t": "1"},
        client_request_id="contract-req",
    )
    assert span is not None
    token = _mlflow.attach(span)
    try:
        assert mlflow.get_current_active_span().span_id == span.span_id
        with mlflow.start_span("child") as child:
            assert child.parent_id == span.span_id
        mlflow.update_current_trace(tags={"from_handler": "yes"})
    finally:
        _mlflow.detach(token)
    assert mlflow.get_current_active_span() is None
    _mlflow.end_span(span, name="GET /raw/{id}", status_code=503, error=None)
    mlflow.flush_trace_async_logging()
    trace = mlflow.get_trace(span.trace_id)
    assert trace.info.client_request_id == "contract-req"
    assert trace.info.trace_metadata["mlflow.trace.user"] == "contract-user"
    assert trace.info.tags["t"] == "1" and trace.info.tags["from_handler"] == "yes"
    assert trace.info.state == "ERROR"
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.name == "GET /raw/{id}" and root.outputs == {"status_code": 503}


def test_a_leaked_current_span_is_never_the_parent() -> None:
    with mlflow.start_span("leaked-from-elsewhere"):
        span = _mlflow.start_root_span("GET /", inputs={}, metadata={}, tags={}, client_request_id="r2")
        assert span is not None and span.parent_id is None
        _mlflow.end_span(span, name="GET /", status_code=200, error=None)


def test_disabled_tracing_gives_no_span() -> None:
    with mlflow.tracing.context(enabled=False) if hasattr(mlflow.tracing, "context") else _disabled():
        assert _mlflow.start_root_span("x", inputs={}, metadata={}, tags={}, client_request_id="r") is None


class _disabled:
    def __enter__(self) -> None:
        mlflow.tracing.disable()

    def __exit__(self, *exc: object) -> None:
        mlflow.tracing.enable()


def test_an_explicit_experiment_id_decides_where_the_trace_goes() -> None:
    """Used for an experiment named only by the environment (tests/test_destination.py)."""
    other = mlflow.create_experiment(f"contract-{uuid.uuid4().hex[:8]}")
    span = _mlflow.start_root_span(
        "GET /", inputs={}, metadata={}, tags={}, client_request_id="r3", experiment_id=other
    )
    assert span is not None
    _mlflow.end_span(span, name="GET /", status_code=200, error=None)
    mlflow.flush_trace_async_logging()
    assert mlflow.get_trace(span.trace_id).info.experiment_id == other
    assert not _mlflow.env_experiment_pending()  # the suite has set an experiment in this process
