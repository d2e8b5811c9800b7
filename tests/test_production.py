"""Production conditions with real server processes: tracking server down, slow or failing;
SIGTERM right after a burst (uvicorn, gunicorn); many concurrent requests."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlflow
import pytest

from conftest import find_traces
from mlflow_ctx_mw.export import export_stats
from mlflow_ctx_mw.testing import free_port, stopping, wait_http

TESTS = Path(__file__).resolve().parent


@contextmanager
def app_process(
    kind: str, tmp_path: Path, env: dict[str, str], *, bare: bool = False, name: str = "app", workers: int = 0
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """tests/served.py under uvicorn (kind "fastapi") or gunicorn (kind "flask": one worker with
    8 threads, or `workers` sync workers)."""
    port = free_port()
    if kind == "fastapi":
        command = [sys.executable, "-m", "uvicorn", "--factory", "served:fastapi", "--port", str(port)]
    else:
        concurrency = ["-w", str(workers)] if workers else ["-w", "1", "--threads", "8"]
        command = [sys.executable, "-m", "gunicorn", *concurrency, "-b", f"127.0.0.1:{port}",
                   "--graceful-timeout", "20", "served:flask()"]  # fmt: skip
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    full_env = {**os.environ, **env, "MLFLOW_CTX_BARE": "1" if bare else "0", "PYTHONPATH": path}
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=TESTS, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    with stopping(proc):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/items/0", proc=proc, timeout=60)
        yield url, proc, log


# --- tracking server down / slow / failing -----------------------------------------------------


class _Broken(http.server.BaseHTTPRequestHandler):
    delay = 0.0

    def _answer(self) -> None:
        time.sleep(self.delay)
        body = b'{"error_code": "INTERNAL_ERROR", "message": "broken on purpose"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the exporter gave up waiting: fine
            self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


#: mode -> seconds the fake server takes to answer 503 (None: a closed port).
BROKEN_MODES = {"down": None, "5xx": 0.0, "slow": 3.0, "hang": 3600.0}


@contextmanager
def broken_tracking_server(mode: str) -> Iterator[str]:
    """ "down": a closed port; "5xx": 503 at once; "slow": 503 after 3 s; "hang": never answers."""
    port = free_port()
    delay = BROKEN_MODES[mode]
    if delay is None:
        yield f"http://127.0.0.1:{port}"
        return
    handler = type("Handler", (_Broken,), {"delay": delay})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.handle_error = lambda request, address: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()


def broken_env(tracking: str) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": tracking,
        "MLFLOW_CTX_EXPERIMENT_ID": "0",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    }


@pytest.mark.scenario
@pytest.mark.parametrize(
    ("mode", "kind"), [("down", "fastapi"), ("down", "flask"), ("5xx", "fastapi"), ("hang", "fastapi"),
                       ("hang", "flask")]
)  # fmt: skip
def test_requests_are_served_while_mlflow_fails(mode: str, kind: str, tmp_path: Path) -> None:
    """Fail-open: no request waits on a tracking server that is down, failing or never answers.
    A request that did would hang with "hang" (the client's 60 s timeout is a hang detector, not a
    speed bound); the latency cost is measured in bench/outage.py."""
    trace_ids = set()
    with (
        broken_tracking_server(mode) as tracking,
        app_process(kind, tmp_path, broken_env(tracking)) as (url, _, log),
        httpx.Client(timeout=60) as client,
    ):
        for i in range(60):
            response = client.get(f"{url}/items/5", headers={"X-User-ID": "outage", "X-Session-ID": f"s{i}"})
            assert response.status_code == 200 and response.json() == {"value": 10}
            trace_ids.add(response.headers.get("X-Trace-ID"))
    assert None not in trace_ids and len(trace_ids) == 60  # each traced (and spooled: test_outage.py)
    lines = log.read_text(errors="replace").splitlines()
    warnings = [line for line in lines if "WARNING" in line or "ERROR" in line]
    assert len(warnings) <= 4, warnings  # once per kind of failure, never once per request


# --- concurrency --------------------------------------------------------------------------------

LOAD = int(os.environ.get("MLFLOW_CTX_LOAD_REQUESTS", "200"))
CONCURRENCY = 64


@pytest.mark.timeout(120 + LOAD // 5)  # a local SQLite server ingests ~10-30 traces/s
def test_concurrent_requests_each_get_exactly_their_own_trace(served: tuple[str, str]) -> None:
    """LOAD requests at concurrency 64 with distinct ids: LOAD traces, 0 lost, 0 mixed.

    The suite runs 200 per adapter (a local SQLite server ingests ~10-30 traces/s);
    MLFLOW_CTX_LOAD_REQUESTS=2000 runs the full-size check.
    """
    _, url = served
    run = uuid.uuid4().hex[:8]
    before = export_stats()
    paths = ["/items/{i}", "/sync-items/{i}"]

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, i: int) -> tuple[int, str]:
        headers = {
            "X-Request-ID": f"r{run}-{i}",
            "X-User-ID": f"u{run}-{i}",
            "X-Session-ID": f"s{run}-{i}",
            "X-Tenant": run,
        }
        async with gate:
            response = await client.get(url + paths[i % 2].format(i=i), headers=headers)
        assert response.status_code == 200 and response.json() == {"value": 2 * i}
        assert response.headers["X-Request-ID"] == headers["X-Request-ID"]
        return i, response.headers["X-Trace-ID"]

    async def burst() -> dict[str, int]:
        gate = asyncio.Semaphore(CONCURRENCY)
        # Idle connections expire before uvicorn's 5 s keep-alive does: at the same 5 s (httpx's
        # default) a request can go out on a connection the server is closing (an httpx.ReadError
        # in CI's load run, on a loaded machine).
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY,
                              keepalive_expiry=2.0)  # fmt: skip
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            pairs = await asyncio.gather(*(one(client, gate, i) for i in range(LOAD)))
        return {trace_id: i for i, trace_id in pairs}

    issued = asyncio.run(burst())
    assert len(issued) == LOAD  # distinct trace ids
    # The apps run in this process: once MLflow's queues are drained, every export has had the
    # server's answer, so a trace missing after this is lost, not late (ingest speed varies a lot).
    mlflow.flush_trace_async_logging()
    traces = find_traces(f"tags.tenant = '{run}'", expected=LOAD, timeout=30)
    landed = {trace.info.trace_id for trace in traces}
    missing = sorted(i for trace_id, i in issued.items() if trace_id not in landed)
    assert len(traces) == LOAD, (missing[:20], export_stats(), before)
    for trace in traces:
        i = issued[trace.info.trace_id]
        meta = trace.info.trace_metadata
        assert (trace.info.client_request_id, meta["mlflow.trace.user"], meta["mlflow.trace.session"]) == (
            f"r{run}-{i}",
            f"u{run}-{i}",
            f"s{run}-{i}",
        )
        assert trace.info.tags["looked_up"] == str(i)  # the handler's own update landed on its own trace
    assert export_stats() == before


# --- drops are visible ----------------------------------------------------------------------------

DROP_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from mlflow_ctx_mw import _mlflow, export_stats
from mlflow_ctx_mw.destination import configure_destination
from mlflow_ctx_mw import Options
configure_destination(Options(experiment_id="0"))
for i in range(300):
    span = _mlflow.start_root_span("GET /", metadata={}, tags={}, client_request_id=f"r{i}")
    _mlflow.end_span(span, name="GET /", attributes={}, status_code=200, error=None)
import mlflow
mlflow.flush_trace_async_logging()
print(json.dumps(export_stats().__dict__))
"""


def test_export_drops_are_counted_and_warned_once(tmp_path: Path) -> None:
    """A queue too small for the load (2 tasks, a slow server): drops show in export_stats()."""
    with broken_tracking_server("slow") as tracking:
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": tracking,
            "MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE": "2",
            "MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS": "1",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "1",
        }
        stats, warnings = run_counting(DROP_SCRIPT, env)
    assert stats["dropped_exports"] > 0
    assert len(warnings) == 1, warnings
    assert "MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE" in warnings[0]


def run_counting(script: str, env: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    """Run `script` in a fresh process: its export_stats() and our drop warnings."""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    warnings = [line for line in out.stderr.splitlines() if "MLflow dropped traces" in line]
    return json.loads(out.stdout.strip().splitlines()[-1]), warnings


EVICT_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from mlflow_ctx_mw import _mlflow, export_stats, Options
from mlflow_ctx_mw.destination import configure_destination
configure_destination(Options(experiment_id="0"))
spans = [_mlflow.start_root_span("GET /", metadata={}, tags={}, client_request_id=f"r{i}") for i in range(20)]
for span in spans:
    _mlflow.end_span(span, name="GET /", attributes={}, status_code=200, error=None)
print(json.dumps(export_stats().__dict__))
"""


def test_traces_evicted_from_mlflows_buffer_are_counted() -> None:
    """20 requests in flight, a buffer of 5: MLflow silently evicts 15 traces; we count them."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "MLFLOW_TRACE_BUFFER_MAX_SIZE": "5",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    stats, warnings = run_counting(EVICT_SCRIPT, env)
    assert stats["evicted_traces"] == 15
    assert len(warnings) == 1 and "MLFLOW_TRACE_BUFFER_MAX_SIZE" in warnings[0], warnings
