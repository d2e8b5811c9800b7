"""Streaming edge cases in every adapter under its real server: disconnects, errors mid-stream,
background tasks; excluded paths."""

from __future__ import annotations

import socket
import uuid
from urllib.parse import urlparse

import httpx
import pytest

import apps
from conftest import find_traces, get_trace


def root_of(trace):  # type: ignore[no-untyped-def]
    return next(s for s in trace.data.spans if s.parent_id is None)


def path_for(adapter: str, name: str) -> str:
    return f"/a{name}" if adapter == "django-asgi" else f"/{name}"


def test_client_disconnect_mid_stream_ends_the_span(served: tuple[str, str]) -> None:
    adapter, url = served
    user = f"gone-{uuid.uuid4().hex[:10]}"
    address = urlparse(url)
    request = (
        f"GET {path_for(adapter, 'slow-stream')} HTTP/1.1\r\nHost: {address.netloc}\r\n"
        f"X-User-ID: {user}\r\n\r\n"
    ).encode()
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while b"data: 0" not in received:
            received += sock.recv(4096)
        head = received.decode("latin-1")
        trace_id = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("x-trace-id")
        )
    # The client is gone after one chunk of apps.SLOW_CHUNKS; the span must end, not stay open.
    [found] = find_traces(f"metadata.`mlflow.trace.user` = '{user}'", timeout=30)
    assert found.info.trace_id == trace_id
    trace = get_trace(trace_id)
    root = root_of(trace)
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["http.client_disconnected"] is True
    assert trace.info.state == "OK"
    chunks = [s for s in trace.data.spans if s.name.startswith("chunk-")]
    assert 1 <= len(chunks) < apps.SLOW_CHUNKS
    assert (root.end_time_ns - root.start_time_ns) / 1e9 < apps.SLOW_CHUNKS * apps.STREAM_DELAY / 2


def test_exception_mid_stream_marks_the_trace_error(served: tuple[str, str]) -> None:
    adapter, url = served
    user = f"broken-{uuid.uuid4().hex[:10]}"
    trace_id = None
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream(
            "GET", url + path_for(adapter, "broken-stream"), headers={"X-User-ID": user}
        ) as response,
    ):
        trace_id = response.headers["X-Trace-ID"]
        for _ in response.iter_bytes():
            pass
    assert trace_id is not None
    [found] = find_traces(f"metadata.`mlflow.trace.user` = '{user}'")
    trace = get_trace(found.info.trace_id)
    assert trace.info.trace_id == trace_id
    assert trace.info.state == "ERROR"
    events = [e for s in trace.data.spans if s.parent_id is None for e in s.events]
    assert any("broken mid-stream" in str(e.attributes) for e in events)


def test_excluded_paths_get_no_span_and_no_header(served: tuple[str, str]) -> None:
    _, url = served
    user = f"skip-{uuid.uuid4().hex[:10]}"
    for path in ("/health", "/static/app.js"):
        response = httpx.get(url + path, headers={"X-User-ID": user})
        assert response.status_code == 404  # the app's own answer, untouched
        assert "X-Trace-ID" not in response.headers and "X-Request-ID" not in response.headers
    httpx.get(url + "/items/1", headers={"X-User-ID": user})  # a traced one, as a marker
    [only] = find_traces(f"metadata.`mlflow.trace.user` = '{user}'")
    assert root_of(get_trace(only.info.trace_id)).attributes["url.path"] == "/items/1"


@pytest.mark.parametrize("served", ["fastapi"], indirect=True)
def test_background_task_runs_after_the_span_ended(served: tuple[str, str]) -> None:
    _, url = served
    apps.BACKGROUND_DONE.clear()
    user = f"bg-{uuid.uuid4().hex[:10]}"
    response = httpx.get(url + "/background", headers={"X-User-ID": user})
    assert response.json() == {"queued": "yes"}
    [found] = find_traces(f"metadata.`mlflow.trace.user` = '{user}'")
    root = root_of(get_trace(found.info.trace_id))
    assert apps.BACKGROUND_DONE.wait(5)
    assert (root.end_time_ns - root.start_time_ns) / 1e9 < 0.3  # ended with the body, not after the task
    assert found.info.state == "OK"
    # Traced work after the response is a trace of its own, not lost under the ended request span.
    [after] = find_traces(f"tags.after_response_of = '{user}'")
    assert after.info.trace_id != found.info.trace_id
    assert [span.name for span in get_trace(after.info.trace_id, ours=False).data.spans] == ["after_response"]
