"""SIGTERM right after a burst leaves every answered request's trace in MLflow, under every
server the README names: each app in its own server process, as deployed, with MLflow's batch
interval at its default 5 s so that the traces are still pending when the signal comes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import EXPERIMENT, find_traces
from mlflow_ctx_mw.testing import free_port, stopping, wait_http

pytestmark = pytest.mark.scenario

TESTS = Path(__file__).resolve().parent
PY = sys.executable

# name -> the server's command line for a port
UVICORN = [PY, "-m", "uvicorn", "--factory"]
GUNICORN = [PY, "-m", "gunicorn", "-w", "1"]
# name -> the server's command line for a port (apps: tests/served.py's factories)
SERVERS: dict[str, Callable[[int], list[str]]] = {
    "uvicorn, lifespan": lambda p: [*UVICORN, "served:fastapi", "--port", str(p)],
    "uvicorn, lifespan off": lambda p: [*UVICORN, "served:fastapi", "--port", str(p), "--lifespan", "off"],
    "uvicorn, Django ASGI": lambda p: [*UVICORN, "served:django_asgi", "--port", str(p)],
    "gunicorn sync": lambda p: [*GUNICORN, "-b", f"127.0.0.1:{p}", "served:flask()"],
    "gunicorn threaded": lambda p: [*GUNICORN, "--threads", "8", "-b", f"127.0.0.1:{p}", "served:flask()"],
    "gunicorn, uvicorn workers": lambda p: [*GUNICORN, "-k", "uvicorn.workers.UvicornWorker", "-b",
                                            f"127.0.0.1:{p}", "served:fastapi()"],
    "waitress, Flask": lambda p: [PY, "-m", "waitress", f"--listen=127.0.0.1:{p}", "--call", "served:flask"],
    "waitress, Django WSGI": lambda p: [PY, "-m", "waitress", f"--listen=127.0.0.1:{p}", "--call",
                                        "served:django_wsgi"],
    "hypercorn, Django ASGI": lambda p: [PY, "-m", "hypercorn", "-b", f"127.0.0.1:{p}",
                                         "served:django_asgi()"],
    "granian, Django ASGI": lambda p: [PY, "-m", "granian", "--interface", "asgi", "--factory", "--port",
                                       str(p), "served:django_asgi"],
}  # fmt: skip


@pytest.mark.parametrize("server", list(SERVERS))
def test_sigterm_right_after_a_burst_loses_nothing(server: str, mlflow_server: str, tmp_path: Path) -> None:
    port = free_port()
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT, "PYTHONPATH": path,
           "MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS": "5000",
           "DJANGO_SETTINGS_MODULE": "djproj.settings",
           # The mechanism is under test, not the speed of a 2-core SQLite server (once >10 s).
           "MLFLOW_CTX_OPTIONS": json.dumps({"shutdown_flush_seconds": 60})}  # fmt: skip
    user = f"burst-{uuid.uuid4().hex[:8]}"
    count = 30
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            SERVERS[server](port), cwd=TESTS, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    with stopping(proc), httpx.Client(timeout=30) as client:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/items/0", proc=proc, timeout=60)
        for i in range(count):
            assert client.get(f"{url}/items/{i}", headers={"X-User-ID": user}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    found = find_traces(f"metadata.`mlflow.trace.user` = '{user}'", expected=count, timeout=30)
    tail = log.read_text(errors="replace")[-3000:]
    assert len(found) == count, f"{len(found)} of {count} traces; exit {proc.returncode}; server log:\n{tail}"
