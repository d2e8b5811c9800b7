"""The built-in feedback endpoint in every adapter and the log_feedback helper, against real MLflow."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import mlflow
import pytest

from conftest import experiment_id, find_traces, get_trace
from mlflow_ctx_mw import _mlflow
from mlflow_ctx_mw.feedback import FeedbackError, log_feedback

FEEDBACK = "/mlflow/feedback"


def served_trace(url: str, **headers: str) -> tuple[str, str, str]:
    """One app request; returns (trace id, client request id, user)."""
    tag = uuid.uuid4().hex[:12]
    sent = {"X-User-ID": f"user-{tag}", "X-Request-ID": f"req-{tag}", **headers}
    response = httpx.get(url + "/items/3", headers=sent)
    assert response.status_code == 200
    return response.headers["X-Trace-ID"], sent["X-Request-ID"], sent["X-User-ID"]


def assessments(trace_id: str, expected: int) -> list:
    deadline = time.monotonic() + 20
    while True:
        found = get_trace(trace_id).info.assessments
        if len(found) >= expected or time.monotonic() > deadline:
            return sorted(found, key=lambda a: a.create_time_ms)
        time.sleep(0.2)


VALUES = [True, False, 4, 0.75, "helpful", ["a", 1, True], {"accuracy": 0.9, "tone": "ok"}]


def test_each_value_kind_lands_right_after_the_response(served: tuple[str, str]) -> None:
    _, url = served
    trace_id, _, user = served_trace(url)
    for i, value in enumerate(VALUES):
        body = {"trace_id": trace_id, "value": value, "name": f"dim{i}"}
        if i == 0:
            body["rationale"] = "clear and short"
        response = httpx.post(url + FEEDBACK, json=body, headers={"X-User-ID": user}, timeout=30)
        assert response.status_code == 201, response.text
        assert response.json()["trace_id"] == trace_id
        assert response.json()["assessment_id"]
    found = assessments(trace_id, len(VALUES))
    assert [a.name for a in found] == [f"dim{i}" for i in range(len(VALUES))]
    assert [a.value for a in found] == VALUES
    assert found[0].rationale == "clear and short"
    assert {(a.source.source_type, a.source.source_id) for a in found} == {("HUMAN", user)}


def test_expectation_by_client_request_id(served: tuple[str, str]) -> None:
    _, url = served
    trace_id, request_id, user = served_trace(url)
    find_traces(f"attributes.client_request_id = '{request_id}'")
    body = {"client_request_id": request_id, "kind": "expectation", "name": "expected_answer", "value": "42"}
    response = httpx.post(url + FEEDBACK, json=body, headers={"X-User-ID": user}, timeout=30)
    assert response.status_code == 201, response.text
    assert response.json()["trace_id"] == trace_id
    [found] = assessments(trace_id, 1)
    assert found.expectation is not None and found.value == "42"
    assert (found.source.source_type, found.source.source_id) == ("HUMAN", user)


def test_feedback_endpoint_is_not_traced(served: tuple[str, str]) -> None:
    _, url = served
    user = f"user-{uuid.uuid4().hex[:12]}"
    response = httpx.post(
        url + FEEDBACK, json={"trace_id": "tr-" + "0" * 32, "value": 1}, headers={"X-User-ID": user}
    )
    assert "X-Trace-ID" not in response.headers
    mlflow.flush_trace_async_logging()
    assert find_traces(f"metadata.`mlflow.trace.user` = '{user}'", timeout=1) == []


def test_unknown_trace_is_404(served: tuple[str, str]) -> None:
    _, url = served
    for body in (
        {"trace_id": "tr-" + "0" * 32, "value": True},
        {"client_request_id": "never-sent", "value": 1},
    ):
        response = httpx.post(url + FEEDBACK, json=body, timeout=30)
        assert response.status_code == 404
        assert response.headers["Content-Type"].startswith("application/json")
        assert "error" in response.json()


MALFORMED = [
    (b"{not json", 400, None),
    (b"[1, 2]", 422, "body"),
    (b'{"value": 1}', 422, "trace_id"),
    (b'{"trace_id": "tr-1", "client_request_id": "r", "value": 1}', 422, "trace_id"),
    (b'{"trace_id": "tr-1"}', 422, "value"),
    (b'{"trace_id": "tr-1", "value": null}', 422, "value"),
    (b'{"trace_id": "tr-1", "value": {"nested": {"x": 1}}}', 422, "value"),
    (b'{"trace_id": "tr-1", "value": [[1]]}', 422, "value"),
    (b'{"trace_id": "tr-1", "value": NaN}', 422, "value"),
    (b'{"trace_id": "tr-1", "value": 1, "name": 5}', 422, "name"),
    (b'{"trace_id": "tr-1", "value": 1, "name": ""}', 422, "name"),
    (b'{"trace_id": "tr-1", "value": 1, "rationale": ["x"]}', 422, "rationale"),
    (b'{"trace_id": "tr-1", "value": 1, "metadata": {"a": {"b": 1}}}', 422, "metadata"),
    (b'{"trace_id": "tr-1", "value": 1, "kind": "opinion"}', 422, "kind"),
    (b'{"trace_id": "tr-1", "value": 1, "kind": "expectation", "rationale": "r"}', 422, "rationale"),
    (b'{"trace_id": "tr-1", "value": 1, "colour": "red"}', 422, "colour"),
    (b'{"trace_id": 7, "value": 1}', 422, "trace_id"),
    (b'{"trace_id": "tr 1", "value": 1}', 422, "trace_id"),
]


@pytest.mark.parametrize(("body", "status", "field"), MALFORMED, ids=[m[0].decode()[:40] for m in MALFORMED])
def test_malformed_bodies_get_a_json_4xx_naming_the_field(
    served: tuple[str, str], body: bytes, status: int, field: str | None
) -> None:
    _, url = served
    response = httpx.post(url + FEEDBACK, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload.get("field") == field
    assert "Traceback" not in response.text


def test_oversized_body_is_413_and_other_methods_405(served: tuple[str, str]) -> None:
    _, url = served
    big = b'{"trace_id": "tr-1", "value": "' + b"x" * (64 * 1024) + b'"}'
    response = httpx.post(url + FEEDBACK, content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "error" in response.json()

    def chunks():  # type: ignore[no-untyped-def]
        yield big  # no Content-Length: chunked transfer encoding, counted while reading

    response = httpx.post(url + FEEDBACK, content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    for method in ("GET", "PUT", "DELETE"):
        response = httpx.request(method, url + FEEDBACK)
        assert response.status_code == 405
        assert response.headers["Allow"] == "POST" and "error" in response.json()


@pytest.mark.parametrize(
    "crafted",
    ["x' OR attributes.client_request_id != '", "' OR '1'='1", "`metadata`", "a\\'", "req-%' OR 1=1 --"],
)
def test_crafted_client_request_id_cannot_change_the_filter(served: tuple[str, str], crafted: str) -> None:
    _, url = served
    victim, request_id, _ = served_trace(url)
    find_traces(f"attributes.client_request_id = '{request_id}'")
    response = httpx.post(url + FEEDBACK, json={"client_request_id": crafted, "value": False}, timeout=30)
    assert response.status_code in (404, 422), response.text
    assert response.json()["field"] == "client_request_id"
    assert get_trace(victim).info.assessments == []


def test_helper_waits_for_a_trace_the_exporter_has_not_written_yet(mlflow_server: str) -> None:
    """Feedback that arrives before the trace exists still lands (bounded wait), not 404."""
    root = _mlflow.start_root_span(
        "GET /slow",
        metadata={},
        tags={},
        client_request_id=f"slow-{uuid.uuid4().hex[:8]}",
        experiment_id=experiment_id(),
    )
    assert root is not None
    span = root.span
    end = {"name": "GET /slow", "attributes": {}, "status_code": 200, "error": None}
    ender = threading.Timer(1.5, _mlflow.end_span, args=(root,), kwargs=end)
    assert mlflow.get_trace(span.trace_id) is None  # not in the backend yet
    ender.start()
    result = log_feedback(trace_id=span.trace_id, value=5, name="stars", user="rater", wait_seconds=20)
    ender.join()
    assert result.trace_id == span.trace_id
    [found] = assessments(span.trace_id, 1)
    assert (found.name, found.value, found.source.source_id) == ("stars", 5, "rater")


def test_helper_validates_like_the_endpoint(mlflow_server: str) -> None:
    with pytest.raises(FeedbackError) as caught:
        log_feedback(trace_id="tr-1", client_request_id="r", value=1)
    assert (caught.value.status, caught.value.field) == (422, "trace_id")
    with pytest.raises(FeedbackError) as caught:
        log_feedback(trace_id="tr-" + "f" * 32, value=1, wait_seconds=0)
    assert caught.value.status == 404


def test_tracking_server_down_is_503(monkeypatch: pytest.MonkeyPatch, mlflow_server: str) -> None:
    """MLflow unreachable (closed port): a JSON 503, not a hang or a stack trace."""
    from conftest import free_port
    from mlflow_ctx_mw import Options, RequestView
    from mlflow_ctx_mw.feedback import feedback_response

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")
    try:
        status, _, body = feedback_response(
            Options(feedback_wait_seconds=0.5),
            RequestView("POST", "/mlflow/feedback", "", {}),
            b'{"trace_id": "tr-' + b"a" * 32 + b'", "value": 1}',
        )
    finally:
        mlflow.set_tracking_uri(mlflow_server)
    assert status == 503 and b"unavailable" in body
