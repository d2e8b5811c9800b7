"""SIGTERM right after a burst leaves every answered request's trace in MLflow, under every
server the README names: each app in its own server process, as deployed, with MLflow's batch
interval at its default 5 s so that the traces are still pending when the signal comes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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
           "DJANGO_SETTINGS_MODULE": "djproj.settings"}  # fmt: skip
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
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # hung: what every thread is doing (served.py)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            stacks = log.read_text(errors="replace")[-12000:]
            pytest.fail(f"no exit 60 s after SIGTERM; server log:\n{stacks}")
    found = find_traces(f"metadata.`mlflow.trace.user` = '{user}'", expected=count, timeout=30)
    tail = log.read_text(errors="replace")[-3000:]
    assert len(found) == count, f"{len(found)} of {count} traces; exit {proc.returncode}; server log:\n{tail}"


# SIGTERM arriving while the server's main thread holds a lock MLflow's exporter needs: seen with
# Django's ASGI handler inside ThreadPoolExecutor.submit, which holds the lock all executors share
# (MLflow's export consumer submits through one). A flush run inside the signal handler waited on
# that consumer while the consumer waited on the interrupted thread, until the flush timed out.
LOCKED_SIGTERM = """
import asyncio, concurrent.futures.thread, os, signal, sys
import mlflow
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.span import prepare

mlflow.set_experiment(sys.argv[1])
signal.signal(signal.SIGTERM, lambda signum, frame: print("server's handler ran", flush=True))

async def main():
    prepare(Options.build(feedback_path=None, shutdown_flush_seconds=5))  # built in the loop, as by uvicorn
    for i in range(5):
        with mlflow.start_span("pending"):  # held by MLflow's 5 s batch interval
            mlflow.update_current_trace(tags={"run": sys.argv[2]})
    with concurrent.futures.thread._global_shutdown_lock:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # Python runs the handler between these, with the lock held
            pass
    await asyncio.sleep(1)  # the loop's next turns
    print("main done", flush=True)

asyncio.run(main())
"""


def test_sigterm_while_the_main_thread_holds_an_executor_lock(mlflow_server: str) -> None:
    run = uuid.uuid4().hex[:8]
    env = {**os.environ, "MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS": "5000"}
    out = subprocess.run([PY, "-c", LOCKED_SIGTERM, EXPERIMENT, run], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["server's handler ran", "main done"]
    assert "not flushed" not in out.stderr, out.stderr[-3000:]
    found = find_traces(f"tags.run = '{run}'", expected=5, timeout=30)
    assert len(found) == 5
