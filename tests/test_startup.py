"""Traced from the first request: an app that names its experiment only in the environment, on a
cold machine whose tracking server is slow to answer, traces its first request; one that cannot
reach it says so once, loudly, serves untraced, and tracing_status() tells why."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import experiment_id, experiment_named, search
from mlflow_ctx_mw.testing import free_port, stopping, wait_http

TESTS = Path(__file__).resolve().parent


@contextmanager
def slow_lookups(upstream: str, delay: float) -> Iterator[str]:
    """A proxy to the tracking server that answers experiment lookups `delay` s late."""

    class Proxy(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            if "/experiments/" in self.path:
                time.sleep(delay)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            request = urllib.request.Request(
                upstream + self.path, data=body, method=self.command, headers=headers
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, payload, kind = (
                        response.status,
                        response.read(),
                        response.headers.get("Content-Type"),
                    )
            except urllib.error.HTTPError as exc:
                status, payload, kind = exc.code, exc.read(), exc.headers.get("Content-Type")
            self.send_response(status)
            self.send_header("Content-Type", kind or "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@contextmanager
def cold_app(
    kind: str, tracking: str, experiment: str, tmp_path: Path, **options: object
) -> Iterator[tuple[str, Path]]:
    """The test app in its own server, configured only by the environment (nothing in code)."""
    port = free_port()
    command = (
        [sys.executable, "-m", "uvicorn", "--factory", "served:fastapi", "--port", str(port)]
        if kind == "fastapi"
        else [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}", "served:flask()"]
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "MLFLOW_EXPERIMENT_NAME": experiment,
           "MLFLOW_CTX_CONFIG": "env", "MLFLOW_CTX_OPTIONS": json.dumps(options),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    log = tmp_path / f"{kind}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=TESTS, env=env, stdout=out, stderr=subprocess.STDOUT)
    with stopping(proc):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc=proc, timeout=60)  # an excluded path: not the first traced request
        yield url, log


@pytest.mark.parametrize("kind", ["fastapi", "flask"])
def test_a_cold_start_traces_its_first_request(kind: str, mlflow_server: str, tmp_path: Path) -> None:
    """Each experiment call takes 1.5 s, 4.5-6 s in all to create it (before: the middleware waited
    2 s, then served untraced). uvicorn runs the lifespan: the startup waits before the server
    takes traffic; gunicorn has none: the first request waits. The bound is generous here
    (startup_wait_seconds, 10 s by default): how long a loaded machine takes is not the point,
    that the first request waits for it is."""
    experiment = f"cold-{uuid.uuid4().hex[:8]}"
    user = f"first-{uuid.uuid4().hex[:8]}"
    with (
        slow_lookups(mlflow_server, 1.5) as tracking,
        cold_app(kind, tracking, experiment, tmp_path, startup_wait_seconds=60) as (url, log),
    ):
        first = httpx.get(url + "/items/1", headers={"X-User-ID": user}, timeout=90)
        status = httpx.get(url + "/tracing-status").json()
    assert first.status_code == 200
    assert "X-Trace-ID" in first.headers, (status, log.read_text(errors="replace")[-2000:])  # it can be rated
    experiment_id = experiment_named(experiment)
    assert experiment_id is not None
    deadline = time.monotonic() + 30
    while not (found := search(f"metadata.`mlflow.trace.user` = '{user}'", experiment=experiment_id)):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert [t.info.trace_id for t in found] == [first.headers["X-Trace-ID"]]


def test_unreachable_tracking_says_so_once_and_serves(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with cold_app("flask", closed, "never", tmp_path, startup_wait_seconds=1) as (url, log):
        time.sleep(1.2)
        statuses = [httpx.get(url + f"/items/{i}").status_code for i in range(5)]
        status = httpx.get(url + "/tracing-status").json()
    assert statuses == [200] * 5
    text = log.read_text(errors="replace")
    assert text.count("tracing is not ready after start-up") == 1, text[-2000:]
    assert status["ready"] is False and "MLFLOW_EXPERIMENT_NAME" in status["detail"]


def test_tracing_status_when_ready(mlflow_server: str) -> None:
    from mlflow_ctx_mw import Options, tracing_status
    from mlflow_ctx_mw.destination import configure_destination, wait_until_ready

    configure_destination(Options())  # as a middleware does when built
    wait_until_ready(10)
    status = tracing_status()
    assert status.ready is True and status.experiment_id == experiment_id()
