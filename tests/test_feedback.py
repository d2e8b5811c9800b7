"""The built-in feedback endpoint in every adapter and the log_feedback helper, against real MLflow.

A client rates the answer it got: with the trace id (or its own request id) and the feedback
token that came with the response. The endpoint answers 202 once the rating is checked; the
assessment lands in the background, which the tests wait for through MLflow's client.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import httpx
import mlflow
import pytest

from conftest import experiment_id, find_traces, get_trace
from mlflow_ctx_mw import _mlflow
from mlflow_ctx_mw.feedback import FeedbackError, log_feedback

FEEDBACK = "/mlflow/feedback"
TOKEN = "X-Feedback-Token"
UNKNOWN = "tr-" + "0" * 32


def served_trace(url: str, path: str = "/items/3", **headers: str) -> tuple[str, str, str, str]:
    """One app request; returns (trace id, client request id, user, feedback token)."""
    tag = uuid.uuid4().hex[:12]
    sent = {"X-User-ID": f"user-{tag}", "X-Request-ID": f"req-{tag}", **headers}
    response = httpx.get(url + path, headers=sent)
    assert response.status_code == 200
    token = response.headers.get(TOKEN, "")  # none under the "user" and "open" policies
    exposed = response.headers["Access-Control-Expose-Headers"].lower()
    assert (TOKEN.lower() in exposed) == bool(token)  # browsers may read it
    return response.headers["X-Trace-ID"], sent["X-Request-ID"], sent["X-User-ID"], token


def post(url: str, body: Any, token: str | None = None, **headers: str) -> httpx.Response:
    sent = {**({TOKEN: token} if token else {}), **headers}
    return httpx.post(url + FEEDBACK, json=body, headers=sent, timeout=30)


def assessments(trace_id: str, expected: int, timeout: float = 30) -> list:
    """The trace's assessments once `expected` are there (delivery is in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        found = get_trace(trace_id).info.assessments
        if len(found) >= expected or time.monotonic() > deadline:
            return sorted(found, key=lambda a: a.create_time_ms)
        time.sleep(0.2)


VALUES = [True, False, 4, 0.75, "helpful", ["a", 1, True], {"accuracy": 0.9, "tone": "ok"}]


def test_each_value_kind_lands_right_after_the_response(served: tuple[str, str]) -> None:
    _, url = served
    trace_id, _, user, token = served_trace(url)
    for i, value in enumerate(VALUES):
        body = {"trace_id": trace_id, "value": value, "name": f"dim{i}"}
        if i == 0:
            body["rationale"] = "clear and short"
        response = post(url, body, token)
        assert response.status_code == 202, response.text
        assert response.json()["trace_id"] == trace_id
        assert response.json()["feedback_id"] and response.json()["status"] == "accepted"
    found = assessments(trace_id, len(VALUES))
    assert sorted(a.name for a in found) == [f"dim{i}" for i in range(len(VALUES))]
    assert [a.value for a in sorted(found, key=lambda a: a.name)] == VALUES
    assert next(a for a in found if a.name == "dim0").rationale == "clear and short"
    # The source is the trace's user, as the token says.
    assert {(a.source.source_type, a.source.source_id) for a in found} == {("HUMAN", user)}


def test_a_changed_rating_updates_the_first(served: tuple[str, str]) -> None:
    """One assessment per (trace, user, name): a changed thumbs is an update, not a second vote."""
    _, url = served
    trace_id, _, _, token = served_trace(url)
    assert post(url, {"trace_id": trace_id, "value": True, "rationale": "good"}, token).status_code == 202
    [first] = assessments(trace_id, 1)
    changed = {"trace_id": trace_id, "value": False, "rationale": "wrong after all"}
    assert post(url, changed, token).status_code == 202
    deadline = time.monotonic() + 30
    while (found := get_trace(trace_id).info.assessments)[0].value is not False:
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    assert [(a.assessment_id, a.value, a.rationale) for a in found] == [
        (first.assessment_id, False, "wrong after all")
    ]


def test_expectation_by_client_request_id(served: tuple[str, str]) -> None:
    _, url = served
    trace_id, request_id, user, token = served_trace(url)
    body = {"client_request_id": request_id, "kind": "expectation", "name": "expected_answer", "value": "42"}
    response = post(url, body, token)
    assert response.status_code == 202, response.text
    assert response.json()["trace_id"] == trace_id  # the token names it
    [found] = assessments(trace_id, 1)
    assert found.expectation is not None and found.value == "42"
    assert (found.source.source_type, found.source.source_id) == ("HUMAN", user)


def test_feedback_endpoint_is_not_traced(served: tuple[str, str]) -> None:
    _, url = served
    user = f"user-{uuid.uuid4().hex[:12]}"
    response = post(url, {"trace_id": UNKNOWN, "value": 1}, **{"X-User-ID": user})
    assert "X-Trace-ID" not in response.headers and TOKEN not in response.headers
    mlflow.flush_trace_async_logging()
    assert find_traces(f"metadata.`mlflow.trace.user` = '{user}'", timeout=1) == []


def test_no_token_is_401_and_another_traces_token_is_403(served: tuple[str, str]) -> None:
    _, url = served
    trace_id, _, _, token = served_trace(url)
    other, other_request, _, _ = served_trace(url)
    for body, sent, status in [
        ({"trace_id": trace_id, "value": True}, None, 401),
        ({"trace_id": trace_id, "value": True}, "not.a-token", 401),
        (
            {"trace_id": trace_id, "value": True},
            token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
            401,
        ),
        ({"trace_id": other, "value": True}, token, 403),
        ({"client_request_id": other_request, "value": True}, token, 403),
        ({"trace_id": UNKNOWN, "value": True}, token, 403),
    ]:
        response = post(url, body, sent)
        assert response.status_code == status, (body, response.text)
        assert response.headers["Content-Type"].startswith("application/json") and "error" in response.json()
    assert get_trace(other).info.assessments == [] and get_trace(trace_id).info.assessments == []


VALID = "tr-" + "a" * 32


def on_a_valid_id(rest: str) -> bytes:
    """A body with a well-formed trace id and `rest` (JSON members) after it."""
    return ('{"trace_id": "' + VALID + '", ' + rest + "}").encode()


MALFORMED = [
    (b"{not json", 400, None),
    (b"[" * 20_000 + b"]" * 20_000, 400, None),  # deeper than the JSON parser recurses
    (b"[1, 2]", 422, "body"),
    (b'{"value": 1}', 422, "trace_id"),
    (on_a_valid_id('"client_request_id": "r", "value": 1'), 422, "trace_id"),
    (b'{"trace_id": "%s"}' % VALID.encode(), 422, "value"),
    *[
        (on_a_valid_id(rest), 422, field)
        for rest, field in [
            ('"value": null', "value"),
            ('"value": {"nested": {"x": 1}}', "value"),
            ('"value": [[1]]', "value"),
            ('"value": NaN', "value"),
            ('"value": "\\ud800"', "value"),  # a lone surrogate
            ('"value": ' + "9" * 401, "value"),
            ('"value": 1, "name": 5', "name"),
            ('"value": 1, "name": ""', "name"),
            ('"value": 1, "name": "a\\nb"', "name"),
            ('"value": 1, "rationale": ["x"]', "rationale"),
            ('"value": 1, "metadata": {"a": {"b": 1}}', "metadata"),
            ('"value": 1, "kind": "opinion"', "kind"),
            ('"value": 1, "kind": "expectation", "rationale": "r"', "rationale"),
            ('"value": 1, "colour": "red"', "colour"),
        ]
    ],
    (b'{"trace_id": 7, "value": 1}', 422, "trace_id"),
    (b'{"trace_id": "tr 1", "value": 1}', 422, "trace_id"),
    (b'{"trace_id": "tr-1", "value": 1}', 422, "trace_id"),
    (b'{"trace_id": "x/../../../../2.0/mlflow/runs/search?", "value": 1}', 422, "trace_id"),
    (b'{"trace_id": "TR-%s", "value": 1}' % (b"A" * 32), 422, "trace_id"),
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
    victim, _, _, token = served_trace(url)
    response = post(url, {"client_request_id": crafted, "value": False}, token)
    assert response.status_code == 422, response.text
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
    again = log_feedback(trace_id=span.trace_id, value=3, name="stars", user="rater")
    assert again.assessment_id == result.assessment_id  # updated, not a second rating


def test_helper_validates_like_the_endpoint(mlflow_server: str) -> None:
    with pytest.raises(FeedbackError) as caught:
        log_feedback(trace_id=VALID, client_request_id="r", value=1)
    assert (caught.value.status, caught.value.field) == (422, "trace_id")
    with pytest.raises(FeedbackError) as caught:
        log_feedback(trace_id="x/../../2.0/mlflow/runs/search?", value=1)
    assert (caught.value.status, caught.value.field) == (422, "trace_id")
    with pytest.raises(FeedbackError) as caught:
        log_feedback(trace_id="tr-" + "f" * 32, value=1, wait_seconds=0)
    assert caught.value.status == 404


def test_helper_says_503_when_the_tracking_server_is_down(
    monkeypatch: pytest.MonkeyPatch, mlflow_server: str
) -> None:
    """MLflow unreachable (closed port): 503, not a hang or a stack trace."""
    from conftest import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(FeedbackError) as caught:
            log_feedback(trace_id="tr-" + "a" * 32, value=1, wait_seconds=0.5)
    finally:
        mlflow.set_tracking_uri(mlflow_server)
    assert caught.value.status == 503 and "unavailable" in caught.value.message


def test_a_trace_whose_spans_are_still_being_written_is_not_there_yet(mlflow_server: str) -> None:
    """MLflow stores a trace's info and its spans in separate calls. Between them the server
    answers BAD_REQUEST "missing span data" for the trace: a rating waiting for it keeps
    waiting (as for a trace not exported yet) instead of being logged as an MLflow failure."""
    from mlflow.entities import TraceInfo, TraceLocation, TraceState
    from mlflow.tracing.client import TracingClient

    trace_id = f"tr-{uuid.uuid4().hex}"
    info = TraceInfo(
        trace_id=trace_id, trace_location=TraceLocation.from_experiment_id(experiment_id()),
        request_time=int(time.time() * 1000), state=TraceState.OK, execution_duration=5,
        trace_metadata={}, tags={},
    )  # fmt: skip
    TracingClient().start_trace(info)  # the info alone, as MLflow's exporter sends it first
    assert _mlflow.stored_trace(trace_id) is None
    assert _mlflow.stored_trace(f"tr-{uuid.uuid4().hex}") is None  # not there at all
