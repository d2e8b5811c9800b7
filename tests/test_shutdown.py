"""SIGTERM right after a burst leaves every answered request's trace in MLflow, under every
server the README names: each app in its own server process, as deployed, with MLflow's batch
interval at its default 5 s so that the traces are still pending when the signal comes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import EXPERIMENT, find_traces
from servers import SERVERS, app_env, served_app, terminate

pytestmark = pytest.mark.scenario

PY = sys.executable


@pytest.mark.parametrize("server", list(SERVERS))
def test_sigterm_right_after_a_burst_loses_nothing(server: str, mlflow_server: str, tmp_path: Path) -> None:
    env = app_env(MLFLOW_EXPERIMENT_NAME=EXPERIMENT, MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS="5000")
    user = f"burst-{uuid.uuid4().hex[:8]}"
    count = 30
    log = tmp_path / "server.log"
    with served_app(server, env, log) as (url, proc), httpx.Client(timeout=30) as client:
        for i in range(count):
            assert client.get(f"{url}/items/{i}", headers={"X-User-ID": user}).status_code == 200
        terminate(proc, log)
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
