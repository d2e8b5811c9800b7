"""Each adapter under its real server, against the real MLflow server, read back through MLflow."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from apps import STREAM_CHUNKS, STREAM_DELAY
from conftest import ENV_FIELDS, find_traces, get_trace

TEMPLATES = {
    "fastapi": ("/items/{item_id}", "/sync-items/{item_id}"),
    "starlette": ("/items/{item_id:int}", "/sync-items/{item_id:int}"),
    "flask": ("/items/<int:item_id>", "/sync-items/<int:item_id>"),
    "django-wsgi": ("/items/<int:item_id>", "/sync-items/<int:item_id>"),
    "django-asgi": ("/items/<int:item_id>", "/sync-items/<int:item_id>"),
}


def ids() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {"X-Request-ID": f"req-{tag}", "X-Session-ID": f"sess-{tag}", "X-User-ID": f"user-{tag}"}


def root_of(trace):  # type: ignore[no-untyped-def]
    roots = [span for span in trace.data.spans if span.parent_id is None]
    assert len(roots) == 1, [span.name for span in trace.data.spans]
    return roots[0]


@pytest.mark.parametrize("handler", [0, 1], ids=["default-handler", "sync-handler"])
def test_one_trace_with_standard_fields(served: tuple[str, str], handler: int) -> None:
    adapter, url = served
    headers = ids()
    path = ["/items/7", "/sync-items/7"][handler]
    response = httpx.get(url + path, headers=headers)
    assert response.status_code == 200
    assert response.json() == {"value": 14}
    trace_id = response.headers["X-Trace-ID"]
    assert response.headers["X-Request-ID"] == headers["X-Request-ID"]
    exposed = {v.strip().lower() for v in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-trace-id", "x-request-id"} <= exposed

    by_user = find_traces(f"metadata.`mlflow.trace.user` = '{headers['X-User-ID']}'")
    by_session = find_traces(f"metadata.`mlflow.trace.session` = '{headers['X-Session-ID']}'")
    by_request = find_traces(f"attributes.client_request_id = '{headers['X-Request-ID']}'")
    assert [t.info.trace_id for t in by_user] == [trace_id]
    assert [t.info.trace_id for t in by_session] == [trace_id]
    assert [t.info.trace_id for t in by_request] == [trace_id]

    trace = get_trace(trace_id)
    info = trace.info
    assert info.state == "OK"
    assert info.client_request_id == headers["X-Request-ID"]
    assert info.trace_metadata["mlflow.source.type"] == ENV_FIELDS["APP_ENVIRONMENT"]
    assert info.trace_metadata["app_version"] == ENV_FIELDS["APP_VERSION"]
    assert info.trace_metadata["deployment_id"] == ENV_FIELDS["DEPLOYMENT_ID"]
    assert info.trace_metadata["region"] == ENV_FIELDS["REGION"]
    assert info.tags["looked_up"] == "7"

    root = root_of(trace)
    assert root.name == f"GET {TEMPLATES[adapter][handler]}"
    assert root.attributes["http.request.method"] == "GET"
    assert root.attributes["url.path"] == path
    assert "url.query" not in root.attributes
    assert root.attributes["http.response.status_code"] == 200
    nested = [span for span in trace.data.spans if span.name == "lookup"]
    assert len(nested) == 1 and nested[0].parent_id == root.span_id
    # The handler's traced call is what the trace list shows as request and response.
    assert (root.inputs, root.outputs) == (nested[0].inputs, nested[0].outputs) == ({"item_id": 7}, 14)


def test_exception_gives_error_trace_and_the_apps_500(served: tuple[str, str]) -> None:
    _, url = served
    headers = ids()
    response = httpx.get(url + "/boom", headers=headers)
    assert response.status_code == 500
    trace_id = response.headers["X-Trace-ID"]
    [found] = find_traces(f"attributes.client_request_id = '{headers['X-Request-ID']}'")
    assert found.info.trace_id == trace_id
    trace = get_trace(trace_id)
    assert trace.info.state == "ERROR"
    root = root_of(trace)
    assert root.attributes["http.response.status_code"] == 500
    assert root.name == "GET /boom"


def test_streamed_response_span_covers_the_stream(served: tuple[str, str]) -> None:
    adapter, url = served
    path = "/astream" if adapter == "django-asgi" else "/stream"
    headers = ids()
    with httpx.stream("GET", url + path, headers=headers) as response:
        trace_id = response.headers["X-Trace-ID"]  # known before the first byte of the body
        body = b"".join(response.iter_bytes())
    assert body.decode().count("data:") == STREAM_CHUNKS
    [found] = find_traces(f"attributes.client_request_id = '{headers['X-Request-ID']}'")
    assert found.info.trace_id == trace_id
    trace = get_trace(trace_id)
    root = root_of(trace)
    chunks = sorted(
        (s for s in trace.data.spans if s.name.startswith("chunk-")), key=lambda s: s.start_time_ns
    )
    assert [s.name for s in chunks] == [f"chunk-{i}" for i in range(STREAM_CHUNKS)]
    assert all(s.parent_id == root.span_id for s in chunks)
    assert root.end_time_ns >= chunks[-1].end_time_ns
    assert root.end_time_ns - root.start_time_ns >= STREAM_CHUNKS * STREAM_DELAY * 1e9 * 0.9
    assert trace.info.state == "OK"


def test_missing_request_id_is_generated_echoed_and_recorded(served: tuple[str, str]) -> None:
    _, url = served
    user = f"user-{uuid.uuid4().hex[:12]}"
    response = httpx.get(url + "/items/1", headers={"X-User-ID": user})
    generated = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    [found] = find_traces(f"metadata.`mlflow.trace.user` = '{user}'")
    assert found.info.trace_id == response.headers["X-Trace-ID"]
    assert found.info.client_request_id == generated
    assert "mlflow.trace.session" not in found.info.trace_metadata


def test_unusable_request_id_is_replaced(served: tuple[str, str]) -> None:
    _, url = served
    user = f"user-{uuid.uuid4().hex[:12]}"
    bad = "x" * 51  # over MLflow's 50-character client_request_id column
    response = httpx.get(url + "/items/1", headers={"X-User-ID": user, "X-Request-ID": bad})
    assert response.status_code == 200
    generated = response.headers["X-Request-ID"]
    assert generated != bad
    [found] = find_traces(f"metadata.`mlflow.trace.user` = '{user}'")
    assert found.info.client_request_id == generated


def test_custom_header_maps_from_options(served: tuple[str, str]) -> None:
    _, url = served
    headers = {**ids(), "X-Tenant": "acme", "X-Client-Version": "ios-3.1", "Authorization": "Basic s3cret"}
    response = httpx.get(url + "/items/2?q=a%20b&n=1", headers=headers)
    trace = get_trace(response.headers["X-Trace-ID"])
    assert root_of(trace).attributes["url.query"] == "q=a%20b&n=1"
    assert trace.info.tags["tenant"] == "acme"
    assert trace.info.trace_metadata["client_version"] == "ios-3.1"
    recorded = repr((trace.info.tags, trace.info.trace_metadata, [s.inputs for s in trace.data.spans]))
    assert "s3cret" not in recorded
