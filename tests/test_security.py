"""The feedback endpoint and the recorded fields under attack: each attack of issue 13, on the
real frameworks under their real servers, against the real tracking server where it matters."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import ADAPTERS, create_experiment, get_trace, serve, tracking_server_log
from mlflow_ctx_mw import Options, OptionsError, export_stats
from mlflow_ctx_mw.security import FeedbackTokens, is_credential_header, redact_query
from test_feedback import FEEDBACK, TOKEN, assessments, post, served_trace

pytestmark = pytest.mark.usefixtures("mlflow_server")

# --- 1. path injection: only ids of the form MLflow issues reach it ----------------------------------

INJECTIONS = [
    "x/../../../../2.0/mlflow/runs/search?",
    "tr-00000000000000000000000000000000/../../../runs/search",
    "tr-%2e%2e%2fruns",
    "../experiments/delete",
    "tr-" + "a" * 32 + "?x=1",
]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_crafted_trace_id_never_reaches_the_tracking_server(adapter: str) -> None:
    """The tracking server logged POST /api/2.0/mlflow/runs/search?/assessments before."""
    with serve(adapter, feedback_auth="open") as url:
        for crafted in INJECTIONS:
            response = post(url, {"trace_id": crafted, "value": 1})
            assert response.status_code == 422 and response.json()["field"] == "trace_id", response.text
    time.sleep(0.5)
    log = tracking_server_log()
    assert log, "the tracking server's log was not found"
    assert "runs/search" not in log and "experiments/delete" not in log and "/../" not in log


# --- 2. no worker held, no multiplied load -------------------------------------------------------------


@contextmanager
def black_hole() -> Iterator[str]:
    """A 'tracking server' that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.parametrize("kind", ["flask", "fastapi"])
def test_feedback_holds_no_worker_while_mlflow_hangs(kind: str, tmp_path: Path) -> None:
    """gunicorn with 2 sync workers (Flask) / uvicorn (FastAPI), a tracking server that never
    answers, anyone may post (open policy): 6 posts on unknown traces at once, then a plain
    route. Before, each post held a worker for its whole wait (~10 s) and the route waited too
    (2 posts: 2 ms -> 9.1 s). No timing is asserted: a held worker never answers here, and the
    client gives up after 15 s."""
    from test_production import app_process

    with black_hole() as hole:
        env = {
            "MLFLOW_TRACKING_URI": hole,
            "MLFLOW_CTX_EXPERIMENT_ID": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
            "MLFLOW_CTX_OPTIONS": json.dumps({"feedback_auth": "open", "feedback_wait_seconds": 30}),
        }
        with app_process(kind, tmp_path, env, workers=2) as (url, _, _), httpx.Client(timeout=15) as client:

            def bogus(i: int) -> int:
                body = {"trace_id": f"tr-{uuid.uuid4().hex}", "value": i}
                return client.post(url + FEEDBACK, json=body).status_code

            with ThreadPoolExecutor(6) as pool:
                statuses = list(pool.map(bogus, range(6)))
            assert statuses == [202] * 6
            assert client.get(url + "/items/4").json() == {"value": 8}


def test_a_client_cannot_multiply_load_rate_limit() -> None:
    with serve("fastapi", feedback_rate_limit=3) as url:
        statuses = [post(url, {"trace_id": "tr-" + "1" * 32, "value": 1}).status_code for _ in range(5)]
        limited = post(url, {"trace_id": "tr-" + "1" * 32, "value": 1})
    assert statuses[:3] == [401] * 3 and statuses[3:] == [429, 429]  # counted before any other work
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1


def test_a_full_delivery_queue_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_ctx_mw import delivery, feedback

    monkeypatch.setattr(feedback, "DELIVERY", delivery._Delivery(size=0))
    with serve("fastapi") as url:
        _, _, _, token = served_trace(url)
        trace_id = get_token_claims(token)["t"]
        response = post(url, {"trace_id": trace_id, "value": 1}, token)
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1


def get_token_claims(token: str) -> dict[str, Any]:
    import base64

    payload = token.split(".")[0]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


# --- 3. only a client entitled to a trace may rate it -------------------------------------------------


def test_feedback_tokens_are_signed_scoped_and_expire() -> None:
    tokens = FeedbackTokens(["s" * 32], ttl_seconds=3600)
    token = tokens.issue("tr-" + "a" * 32, "req-1", "alice", now=1000.0)
    claims = tokens.verify(token, now=1000.0 + 3599)
    assert claims is not None and (claims.trace_id, claims.client_request_id, claims.user) == (
        "tr-" + "a" * 32, "req-1", "alice",
    )  # fmt: skip
    assert tokens.verify(token, now=1000.0 + 3601) is None  # expired
    assert FeedbackTokens(["t" * 32], 3600).verify(token, now=1000.0) is None  # another app's secret
    rotated = FeedbackTokens(["n" * 32, "s" * 32], 3600)
    assert rotated.verify(token, now=1000.0) is not None  # the old secret still verifies
    signature = token.split(".")[1]
    forged = json.dumps({"t": "tr-" + "b" * 32, "r": "req-1", "u": "alice", "e": 9_999_999_999}).encode()
    import base64

    forged_payload = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
    assert tokens.verify(f"{forged_payload}.{signature}", now=1000.0) is None
    assert (
        tokens.verify("x" * 5000) is None and tokens.verify("a.b.c") is None and tokens.verify("é.x") is None
    )


def test_a_secret_is_required_at_start_up_for_the_token_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_ctx_mw.asgi import MlflowContextMiddleware

    monkeypatch.delenv("MLFLOW_CTX_FEEDBACK_SECRET")
    with pytest.raises(OptionsError, match="MLFLOW_CTX_FEEDBACK_SECRET"):
        MlflowContextMiddleware(lambda *a: None)
    with pytest.raises(OptionsError, match="16"):
        Options(feedback_secret="short")
    assert Options(feedback_path=None).feedback_tokens is None  # no endpoint: nothing to sign
    assert Options(feedback_auth="open").feedback_tokens is None


@pytest.mark.parametrize("adapter", ["fastapi", "django-wsgi"])
def test_expectations_are_refused_unless_enabled(adapter: str) -> None:
    with serve(adapter, feedback_kinds=["feedback"]) as url:
        trace_id, _, _, token = served_trace(url)
        response = post(url, {"trace_id": trace_id, "kind": "expectation", "value": "42"}, token)
    assert response.status_code == 403 and response.json()["field"] == "kind"


@pytest.mark.parametrize("adapter", ["django-wsgi", "django-asgi"])
def test_a_token_is_not_for_another_logged_in_user(adapter: str) -> None:
    with serve(adapter) as url:
        trace_id, _, _, token = served_trace(url, **{"Authorization": "Bearer alice"})
        response = post(url, {"trace_id": trace_id, "value": 1}, token, Authorization="Bearer mallory")
    assert response.status_code == 403 and "another user" in response.json()["error"]


def wait_for(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.2)


def test_open_policy_still_keeps_feedback_to_the_apps_experiment() -> None:
    """A trace of another experiment (another app's) is refused at delivery."""
    from mlflow_ctx_mw import _mlflow

    other = create_experiment(f"other-app-{uuid.uuid4().hex[:8]}")
    root = _mlflow.start_root_span(
        "GET /", metadata={}, tags={}, client_request_id="other", experiment_id=other
    )
    assert root is not None
    _mlflow.end_span(root, name="GET /", attributes={}, status_code=200, error=None)
    foreign = root.span.trace_id
    get_trace(foreign)
    before = export_stats().feedback_refused
    with serve("fastapi", feedback_auth="open") as url:
        assert post(url, {"trace_id": foreign, "value": True}).status_code == 202
        wait_for(lambda: export_stats().feedback_refused > before)
    assert get_trace(foreign).info.assessments == []


@pytest.mark.parametrize("adapter", ["django-wsgi", "django-asgi"])
def test_user_policy_rates_only_the_users_own_traces(adapter: str) -> None:
    with serve(adapter, feedback_auth="user", trust_user_header=None) as url:
        mine, _, _, _ = served_trace(url, **{"Authorization": "Bearer bob"})
        assert post(url, {"trace_id": mine, "value": True}).status_code == 401  # not signed in
        before = export_stats().feedback_refused
        response = post(url, {"trace_id": mine, "value": True}, Authorization="Bearer eve")
        assert response.status_code == 202  # checked against the stored trace, in the background
        wait_for(lambda: export_stats().feedback_refused > before)
        assert post(url, {"trace_id": mine, "value": True}, Authorization="Bearer bob").status_code == 202
    [rating] = assessments(mine, 1)
    assert rating.source.source_id == "bob"


# --- 4. the app's user, on every adapter --------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["django-wsgi", "django-asgi"])
def test_with_authentication_the_user_header_names_nobody_by_default(adapter: str) -> None:
    """Before, an unauthenticated X-User-ID was recorded (and was the feedback source)."""
    with serve(adapter, trust_user_header=None) as url:
        trace_id, _, _, token = served_trace(url)  # X-User-ID only, nobody logged in
        assert post(url, {"trace_id": trace_id, "value": True}, token).status_code == 202
    trace = get_trace(trace_id)
    assert "mlflow.trace.user" not in trace.info.trace_metadata
    [rating] = assessments(trace_id, 1)
    assert rating.source.source_id == "anonymous"


def test_flask_login_user_is_the_trace_user_and_the_feedback_source() -> None:
    from conftest import WaitressThread
    from test_stack import flask_with_login

    with WaitressThread(flask_with_login()) as url:
        response = httpx.get(
            url + "/hello", headers={"Authorization": "Bearer fiona", "X-User-ID": "spoofed"}
        )
        trace_id, token = response.headers["X-Trace-ID"], response.headers[TOKEN]
        assert get_token_claims(token)["u"] == "fiona"
        rated = post(url, {"trace_id": trace_id, "value": True}, token, Authorization="Bearer fiona")
        assert rated.status_code == 202
        # The user policy reads Flask-Login's user for the endpoint too.
        with WaitressThread(flask_with_login(feedback_auth="user")) as url2:
            other = httpx.get(url2 + "/hello", headers={"Authorization": "Bearer gus"}).headers["X-Trace-ID"]
            assert (
                post(
                    url2, {"trace_id": other, "value": 3, "name": "stars"}, Authorization="Bearer gus"
                ).status_code
                == 202
            )
    assert get_trace(trace_id).info.trace_metadata["mlflow.trace.user"] == "fiona"
    assert [a.source.source_id for a in assessments(trace_id, 1)] == ["fiona"]
    assert [a.source.source_id for a in assessments(other, 1)] == ["gus"]


# --- 5. someone else's request id ---------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["fastapi", "flask"])
def test_a_shared_request_id_never_rates_the_other_clients_trace(adapter: str) -> None:
    shared = f"chat-{uuid.uuid4().hex[:6]}"
    with serve(adapter) as url:
        mine, _, _, token = served_trace(url, **{"X-Request-ID": shared})
        theirs, _, _, _ = served_trace(url, **{"X-Request-ID": shared})
        assert post(url, {"client_request_id": shared, "value": True}, token).status_code == 202
    assert len(assessments(mine, 1)) == 1
    assert get_trace(theirs).info.assessments == []


def test_open_policy_refuses_an_ambiguous_request_id_everywhere() -> None:
    shared = f"chat-{uuid.uuid4().hex[:6]}"
    with serve("fastapi", feedback_auth="open") as url:
        a, _, _, _ = served_trace(url, **{"X-Request-ID": shared})
        b, _, _, _ = served_trace(url, **{"X-Request-ID": shared})
        get_trace(a), get_trace(b)
        before = export_stats().feedback_refused
        assert post(url, {"client_request_id": shared, "value": True}).status_code == 202
        wait_for(lambda: export_stats().feedback_refused > before)
    assert get_trace(a).info.assessments == [] and get_trace(b).info.assessments == []


# --- 6. cross-site posts ----------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_cross_site_posts_are_refused(adapter: str) -> None:
    with serve(adapter) as url:
        trace_id, _, _, token = served_trace(url)
        body = json.dumps({"trace_id": trace_id, "value": True})
        plain = httpx.post(url + FEEDBACK, content=body, headers={"Content-Type": "text/plain", TOKEN: token})
        form = httpx.post(url + FEEDBACK, data={"trace_id": trace_id}, headers={TOKEN: token})
        foreign = httpx.post(
            url + FEEDBACK, content=body, headers={"Content-Type": "application/json", TOKEN: token,
                                                   "Origin": "https://evil.example"}
        )  # fmt: skip
        same_site = httpx.post(
            url + FEEDBACK, content=body, headers={"Content-Type": "application/json", TOKEN: token,
                                                   "Origin": url}
        )  # fmt: skip
    assert (plain.status_code, form.status_code, foreign.status_code) == (415, 415, 403)
    assert same_site.status_code == 202


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_cors_preflight_is_answered_when_the_app_opts_in(adapter: str) -> None:
    origin = "https://chat.example"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, x-feedback-token"}  # fmt: skip
    with serve(adapter) as url:
        not_ours = httpx.options(url + FEEDBACK, headers=preflight)
    with serve(adapter, feedback_cors_origins=[origin]) as url:
        answered = httpx.options(url + FEEDBACK, headers=preflight)
        trace_id, _, _, token = served_trace(url)
        cross = post(url, {"trace_id": trace_id, "value": 1}, token, Origin=origin)
    assert "access-control-allow-origin" not in not_ours.headers  # the app's own answer
    assert answered.status_code == 204
    assert answered.headers["Access-Control-Allow-Origin"] == origin
    assert "x-feedback-token" in answered.headers["Access-Control-Allow-Headers"].lower()
    assert cross.status_code == 202 and cross.headers["Access-Control-Allow-Origin"] == origin


# --- 7. client errors are client errors -------------------------------------------------------------


def test_client_errors_are_not_logged_as_mlflow_failures(caplog: pytest.LogCaptureFixture) -> None:
    from mlflow_ctx_mw import _logonce
    from mlflow_ctx_mw.feedback import FeedbackError, log_feedback

    _logonce.reset()
    with serve("fastapi") as url:
        for body in (b'{"trace_id": "tr-%s", "value": "\\ud800"}' % (b"a" * 32),
                     b'{"trace_id": "tr-%s", "value": %s}' % (b"a" * 32, b"9" * 401),
                     b"[" * 20_000):  # fmt: skip
            response = httpx.post(url + FEEDBACK, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code in (400, 422)
    assert [r for r in caplog.records if r.name == "mlflow_ctx_mw"] == []
    # A real MLflow failure afterwards is still told (the once-per-process line was not used up).
    import mlflow

    tracking = mlflow.get_tracking_uri()
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], old = (
        "0",
        os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"),
    )
    mlflow.set_tracking_uri(f"http://127.0.0.1:{_closed_port()}")
    try:
        with pytest.raises(FeedbackError):
            log_feedback(trace_id="tr-" + "c" * 32, value=1, wait_seconds=0.3)
    finally:
        mlflow.set_tracking_uri(tracking)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = old or "2"
    assert any("MLflow failed to store feedback" in r.getMessage() for r in caplog.records)


def _closed_port() -> int:
    from mlflow_ctx_mw.testing import free_port

    return free_port()


# --- 8. the smaller holes ---------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("path", ["/mlflow%2Ffeedback", "//mlflow/feedback", "/mlflow/feedback/"])
def test_the_endpoint_answers_only_its_exact_path(adapter: str, path: str) -> None:
    with serve(adapter) as url:
        address = urlparse(url)
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
        conn.request(
            "POST", path, body=b'{"trace_id": "x", "value": 1}', headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        body = response.read()
        conn.close()
    # Not our endpoint's answer (a JSON 422 on the trace id): the app's own (404/405/301...).
    assert b'"field": "trace_id"' not in body and response.status != 422, (response.status, body[:200])


@pytest.mark.parametrize(
    "header",
    ["X-Auth-Token", "X-Amz-Security-Token", "Api-Key", "X-Goog-Api-Key", "X-CSRFToken", "Authorization",
     "Cookie", "X-Hub-Signature-256", "X-Access-Token", "X-Client-Secret", "Proxy-Authorization"],
)  # fmt: skip
def test_credential_headers_are_never_mapped(header: str) -> None:
    assert is_credential_header(header)
    for option in ("header_metadata", "header_tags"):
        with pytest.raises(OptionsError, match="carries credentials"):
            Options(**{option: {header: "k"}})
    with pytest.raises(OptionsError, match="carries credentials"):
        Options(user_id_header=header)


@pytest.mark.parametrize("header", ["X-Session-ID", "X-Tenant", "X-Auth-Request-User", "X-Client-Version"])
def test_ids_that_are_not_credentials_stay_mappable(header: str) -> None:
    assert not is_credential_header(header)
    assert Options(header_metadata={header: "k"}).header_metadata == {header.lower(): "k"}


STANDARD = ["Content-Length", "Content-Type", "Set-Cookie", "Location", "Transfer-Encoding",
            "Access-Control-Allow-Origin", "Connection"]  # fmt: skip


@pytest.mark.parametrize("name", STANDARD)
def test_our_response_headers_cannot_take_a_standard_name(name: str) -> None:
    for option in ("trace_id_header", "request_id_header", "feedback_token_header"):
        with pytest.raises(OptionsError, match=r"standard HTTP header|carries credentials"):
            Options(**{option: name})


@pytest.mark.parametrize("adapter", ["fastapi", "flask"])
def test_a_spoofed_traceparent_is_not_followed_by_default(adapter: str) -> None:
    victim = "0af7651916cd43dd8448eb211c80319c"
    spoof = {"traceparent": f"00-{victim}-b7ad6b7169203331-01"}
    with serve(adapter) as url:
        by_default, _, _, _ = served_trace(url, **spoof)
    with serve(adapter, accept_traceparent=["10.0.0.0/8"]) as url:  # we call from 127.0.0.1
        untrusted_peer, _, _, _ = served_trace(url, **spoof)
    with serve(adapter, accept_traceparent=["127.0.0.1/32"]) as url:
        trusted_peer, _, _, _ = served_trace(url, **spoof)
    key = "mlflow_ctx.caller_trace_id"
    assert key not in get_trace(by_default).info.trace_metadata
    assert key not in get_trace(untrusted_peer).info.trace_metadata
    assert get_trace(trusted_peer).info.trace_metadata[key] == f"tr-{victim}"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_secrets_in_query_strings_are_redacted(adapter: str) -> None:
    with serve(adapter) as url:
        response = httpx.get(url + "/items/5?api_key=sk-live-123&q=weather&Signature=abc&token=t0k")
    root = next(s for s in get_trace(response.headers["X-Trace-ID"]).data.spans if s.parent_id is None)
    query = root.attributes["url.query"]
    assert "sk-live-123" not in query and "abc" not in query and "t0k" not in query
    assert query == "api_key=REDACTED&q=weather&Signature=REDACTED&token=REDACTED"


def test_the_apps_own_redaction_covers_every_recorded_field() -> None:
    def redact(field: str, value: str) -> str | None:
        if field == "url.path":
            return "/items/{id}"
        return None if field == "client_version" else value.replace("acme", "[tenant]")

    headers = {"X-Tenant": "acme-corp", "X-Client-Version": "ios-1.2 serial=42"}
    with serve("fastapi", redact=redact) as url:
        response = httpx.get(url + "/items/9", headers=headers)
    trace = get_trace(response.headers["X-Trace-ID"])
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert trace.info.tags["tenant"] == "[tenant]-corp"
    assert "client_version" not in trace.info.trace_metadata
    assert root.attributes["url.path"] == "/items/{id}"


def test_redact_query_keeps_what_is_not_sensitive() -> None:
    names = frozenset({"token", "sig"})
    assert redact_query("a=1&b=2", names) == "a=1&b=2"  # untouched, not even re-encoded
    assert redact_query("TOKEN=x&a=%20b", names) == "TOKEN=REDACTED&a=%20b"
    assert redact_query("", names) == ""


# --- no MLflow call for anything invalid (hypothesis) -----------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
IDS = st.one_of(
    st.text(max_size=60),
    st.from_regex(r"tr-[0-9a-f]{32}", fullmatch=True),
    st.sampled_from(INJECTIONS),
    st.integers(),
    st.none(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(trace_id="tr-" + "a" * 32, client_request_id=None, value=True, extra={}, raw=None, with_token=True)
@example(trace_id=None, client_request_id="req-a", value=3, extra={"name": "n"}, raw=None, with_token=True)
@given(
    trace_id=IDS,
    client_request_id=st.one_of(st.none(), st.text(max_size=60)),
    value=JSON_VALUES,
    extra=st.dictionaries(st.sampled_from(["name", "rationale", "metadata", "kind", "junk"]), JSON_VALUES),
    raw=st.one_of(st.none(), st.binary(max_size=200)),
    with_token=st.booleans(),
)
def test_an_invalid_request_never_calls_mlflow_nor_queues(
    trace_id: object, client_request_id: object, value: object, extra: dict[str, object], raw: bytes | None,
    with_token: bool,
) -> None:  # fmt: skip
    from mlflow_ctx_mw import _mlflow, feedback
    from mlflow_ctx_mw.feedback import FeedbackEndpoint, FeedbackRequest

    body = {"trace_id": trace_id, "client_request_id": client_request_id, "value": value, **extra}
    data = raw if raw is not None else json.dumps({k: v for k, v in body.items() if v is not None}).encode()
    options = Options(feedback_rate_limit=0)
    endpoint = FeedbackEndpoint(options)
    token = options.feedback_tokens.issue("tr-" + "a" * 32, "req-a", "alice") if with_token else None  # type: ignore[union-attr]
    calls: list[str] = []
    spied = {
        name: getattr(_mlflow, name)
        for name in ("stored_trace", "traces_by_client_request_id", "write_assessment")
    }
    submitted: list[object] = []
    try:
        for name in spied:
            setattr(_mlflow, name, lambda *a, _n=name, **k: calls.append(_n))
        real_submit, feedback.DELIVERY.submit = (
            feedback.DELIVERY.submit,
            lambda r: submitted.append(r) or True,
        )  # type: ignore[method-assign]
        headers = {"content-type": "application/json", **({"x-feedback-token": token} if token else {})}
        answer = endpoint.answer(FeedbackRequest("POST", headers, data, "127.0.0.1", None))
    finally:
        for name, original in spied.items():
            setattr(_mlflow, name, original)
        feedback.DELIVERY.submit = real_submit  # type: ignore[method-assign]
    assert answer is not None
    status, _, payload = answer
    assert calls == []  # the endpoint itself never calls MLflow
    if status == 202:  # only a sound rating on the token's own trace is queued
        [rating] = submitted
        assert rating.trace_id == "tr-" + "a" * 32 and with_token  # type: ignore[attr-defined]
    else:
        assert submitted == [] and 400 <= status < 500 and json.loads(payload)["error"]
