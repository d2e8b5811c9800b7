"""Nothing lost while the tracking server is down: the outage of issue 15, under each adapter in
its own server process, against a real tracking server that is stopped and started again.

40 requests, the server stopped, more requests than MLflow's export queue holds (and ratings on
some of them), the app redeployed (SIGTERM, a new process) while the server is still down, 20
requests (the new process cannot resolve its experiment), the server back, 40 requests: every
trace in MLflow exactly once, each with its own fields, every rating on its own trace. And a
process SIGKILLed with a full spool: the next process on that spool sends it."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import FEEDBACK_SECRET, SERVER_PYTHON, search
from mlflow_ctx_mw.testing import free_port, local_mlflow_server
from servers import app_env, served_app, terminate

pytestmark = pytest.mark.scenario
RATING = "user_feedback"


class TrackingServer:
    """A real `mlflow server` (SQLite) that can be stopped and started again on its port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._stack: contextlib.ExitStack | None = None

    def start(self) -> None:
        deadline = time.monotonic() + 60
        while free_port(self.port) != self.port:  # the last one's workers may linger a moment
            assert time.monotonic() < deadline, f"port {self.port} stays busy"
            time.sleep(0.2)
        self._stack = contextlib.ExitStack()
        started = local_mlflow_server(self.workdir, self.port, python=SERVER_PYTHON)
        assert self._stack.enter_context(started) == self.url

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @contextlib.contextmanager
    def reading(self) -> Iterator[Any]:
        """MLflow's fluent API on this server, on the lean install too (spans stored as artifacts
        resolve their repository from the process's tracking URI: set while reading, put back)."""
        import mlflow

        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.url)
        try:
            yield mlflow
        finally:
            mlflow.set_tracking_uri(before)

    def traces(self, experiment_name: str, user: str) -> list[Any]:
        """Every trace of `user` in the experiment (with its spans, read as a user would)."""
        answer = httpx.get(f"{self.url}/api/2.0/mlflow/experiments/get-by-name",
                           params={"experiment_name": experiment_name}, timeout=30)  # fmt: skip
        if answer.status_code == 404:
            return []
        experiment = answer.raise_for_status().json()["experiment"]["experiment_id"]
        with self.reading():
            return search(f"metadata.`mlflow.trace.user` = '{user}'", experiment)

    def assessments(self, trace_id: str) -> list[Any]:
        with self.reading() as mlflow:
            return list(mlflow.get_trace(trace_id).info.assessments)


@contextlib.contextmanager
def tracking_server(workdir: Path, *, up: bool = True) -> Iterator[TrackingServer]:
    server = TrackingServer(workdir)
    if up:
        server.start()
    try:
        yield server
    finally:
        server.stop()


def outage_env(tracking: TrackingServer, spool: Path, name: str, **extra: str) -> dict[str, str]:
    """Named by the environment only, as in a container: the experiment must be resolved by a
    process that may start while the server is down."""
    return app_env(
        MLFLOW_TRACKING_URI=tracking.url,
        MLFLOW_EXPERIMENT_NAME=name,
        MLFLOW_CTX_CONFIG="env",
        MLFLOW_CTX_SPOOL_DIR=str(spool),
        MLFLOW_CTX_FEEDBACK_SECRET=FEEDBACK_SECRET,
        MLFLOW_CTX_OPTIONS='{"spool_replay_per_second": 200}',
        **extra,
    )


class Client:
    """Requests with their own ids, session and user; remembers what each response said."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.http = httpx.Client(timeout=60)
        self.sent: dict[str, tuple[str, str]] = {}  # request id -> (trace id, feedback token)
        self.rated: dict[str, bool] = {}  # trace id -> the rating sent on it

    def burst(self, url: str, phase: str, count: int) -> None:
        for i in range(count):
            request_id = f"{self.user}-{phase}-{i}"
            headers = {"X-User-ID": self.user, "X-Request-ID": request_id, "X-Session-ID": f"s-{request_id}"}
            response = self.http.get(f"{url}/items/{i}", headers=headers)
            assert response.status_code == 200 and response.json() == {"value": 2 * i}, response.text
            self.sent[request_id] = (response.headers["X-Trace-ID"], response.headers["X-Feedback-Token"])

    def rate(self, url: str, phase: str, count: int) -> None:
        for i in range(count):
            trace_id, token = self.sent[f"{self.user}-{phase}-{i}"]
            value = i % 2 == 0
            response = self.http.post(f"{url}/mlflow/feedback", json={"trace_id": trace_id, "value": value},
                                      headers={"X-Feedback-Token": token})  # fmt: skip
            assert response.status_code == 202, response.text
            self.rated[trace_id] = value


def spool_entries(spool: Path) -> int:
    return sum(1 for _ in spool.glob("*/traces/*.json"))


def wait_until_stored(tracking: TrackingServer, name: str, client: Client, log: Path) -> list[Any]:
    deadline = time.monotonic() + 120 + len(client.sent) / 5  # a SQLite server takes ~10-30 traces/s
    while True:
        found = tracking.traces(name, client.user)
        if len(found) >= len(client.sent) or time.monotonic() > deadline:
            time.sleep(1)  # would a duplicate land too?
            found = tracking.traces(name, client.user)
            tail = log.read_text(errors="replace")[-3000:]
            assert len(found) == len(client.sent), (
                f"{len(found)} of {len(client.sent)} traces; app log:\n{tail}"
            )
            return found
        time.sleep(2)


def assert_each_once_with_its_own_fields(found: list[Any], client: Client) -> None:
    by_request = {trace.info.client_request_id: trace.info for trace in found}
    assert len(by_request) == len(found) and set(by_request) == set(client.sent)  # each once, none else
    # Whole: the request's span and the app's own (a trace missing spans is never found at all).
    for trace in found:
        assert len(trace.data.spans) == 2 and "lookup" in {span.name for span in trace.data.spans}
    for request_id, (trace_id, _) in client.sent.items():
        info = by_request[request_id]
        assert info.trace_id == trace_id
        assert info.trace_metadata["mlflow.trace.session"] == f"s-{request_id}"
        assert info.trace_metadata["mlflow.trace.user"] == client.user


# server -> (requests during the outage, MLflow's export queue size: None is its default, 1000)
SCENARIOS = {
    "uvicorn, lifespan": (1100, None),
    "gunicorn threaded": (150, "100"),
    "waitress, Django WSGI": (150, "100"),
    "uvicorn, Django ASGI": (150, "100"),
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("server", list(SCENARIOS))
def test_an_outage_with_a_redeploy_loses_no_trace_and_no_rating(server: str, tmp_path: Path) -> None:
    during, queue = SCENARIOS[server]
    name = f"outage-{uuid.uuid4().hex[:8]}"
    client = Client(f"u{uuid.uuid4().hex[:8]}")
    log = tmp_path / "app.log"
    with tracking_server(tmp_path / "mlflow") as tracking:
        extra = {"MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE": queue} if queue else {}
        env = outage_env(tracking, tmp_path / "spool", name, **extra)
        with served_app(server, env, log) as (url, proc):
            client.burst(url, "before", 40)
            tracking.stop()
            client.burst(url, "during", during)
            client.rate(url, "during", 4)
            terminate(proc, log)
        with served_app(server, env, log) as (url, proc):  # redeployed, the server still down
            client.burst(url, "redeployed", 20)
            client.rate(url, "redeployed", 2)
            tracking.start()
            client.burst(url, "after", 40)
            found = wait_until_stored(tracking, name, client, log)
            assert_each_once_with_its_own_fields(found, client)
            deadline = time.monotonic() + 60
            for trace_id, value in client.rated.items():
                while not (
                    ratings := [a for a in tracking.assessments(trace_id) if a.name == "user_feedback"]
                ):
                    assert time.monotonic() < deadline, f"no rating on {trace_id}"
                    time.sleep(1)
                assert [a.value for a in ratings] == [value]
            terminate(proc, log)


def test_a_killed_process_spool_is_sent_by_the_next_one(tmp_path: Path) -> None:
    """SIGKILL (an OOM kill) with a spool of traces from a process that never reached the server
    (its experiment not even resolved); the next process on the spool, under another server, sends
    them."""
    name = f"killed-{uuid.uuid4().hex[:8]}"
    client = Client(f"k{uuid.uuid4().hex[:8]}")
    spool = tmp_path / "spool"
    log = tmp_path / "app.log"
    with tracking_server(tmp_path / "mlflow", up=False) as tracking:
        env = outage_env(tracking, spool, name)
        with served_app("uvicorn, lifespan", env, log) as (url, proc):
            client.burst(url, "killed", 30)
            deadline = time.monotonic() + 60
            while spool_entries(spool) < 31:  # and the readiness probe's request (/items/0)
                assert time.monotonic() < deadline, f"{spool_entries(spool)} entries spooled"
                time.sleep(0.2)
            proc.kill()
            proc.wait()
        tracking.start()
        with served_app("gunicorn sync", env, log):
            found = wait_until_stored(tracking, name, client, log)
        assert_each_once_with_its_own_fields(found, client)
        assert spool_entries(spool) == 0


def test_an_unwritable_spool_fails_no_request(tmp_path: Path) -> None:
    """A spool directory that cannot be written (here: under a file) while the server is down:
    every request is served; the spool says so once."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    log = tmp_path / "app.log"
    with tracking_server(tmp_path / "mlflow", up=False) as tracking:
        env = outage_env(
            tracking, blocker / "spool", f"ro-{uuid.uuid4().hex[:8]}", MLFLOW_CTX_EXPERIMENT_ID="0"
        )
        client = Client("ro")
        with served_app("gunicorn threaded", env, log) as (url, _):
            client.burst(url, "ro", 30)
    lines = log.read_text(errors="replace").splitlines()
    assert sum("spool directory" in line for line in lines) == 1, lines[-40:]
    assert not any("Traceback" in line for line in lines if "spool" in line)
    assert os.path.isfile(blocker)
