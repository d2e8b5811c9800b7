"""The spool, in this process, against the session's real tracking server: a trace and a rating
spooled while the server is taken for down are sent when it answers, once, under every adapter;
corrupt entries are skipped; the files keep their bounds; an unwritable directory degrades to
dropping. The whole-outage scenarios (server stopped, app redeployed, SIGKILL) are in
test_outage.py."""

from __future__ import annotations

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

from conftest import EXPERIMENT, find_traces, get_trace
from mlflow_ctx_mw import _exporter, export_stats
from mlflow_ctx_mw.replay import SPOOLER
from mlflow_ctx_mw.spool import SpoolFiles


@contextmanager
def taken_for_down() -> Iterator[SpoolFiles]:
    """The spool believes the server is down (as after a failed export) and holds off replays;
    on the way out it may probe again: the server answers, the spool is sent."""
    assert SPOOLER.files is not None, "the apps under test set up the spool"
    with SPOOLER._wake:
        SPOOLER.down = True
        SPOOLER._retry_at = float("inf")
    try:
        yield SPOOLER.files
    finally:
        with SPOOLER._wake:
            SPOOLER._retry_at = 0.0
            SPOOLER._wake.notify()


def wait_for(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def spooled(files: SpoolFiles, kind: str, key: str) -> bool:
    return any(entry.key == key for entry in files.list(kind))


def test_a_request_and_its_rating_while_down_arrive_once_when_back(served: tuple[str, str]) -> None:
    _, url = served
    request_id = f"spool-{uuid.uuid4().hex[:12]}"
    before = export_stats()
    with taken_for_down() as files, httpx.Client(timeout=30) as client:
        response = client.get(
            f"{url}/items/7", headers={"X-Request-ID": request_id, "X-Session-ID": "s-spool"}
        )
        assert response.status_code == 200 and response.json() == {"value": 14}
        trace_id, token = response.headers["X-Trace-ID"], response.headers["X-Feedback-Token"]
        wait_for(lambda: spooled(files, "traces", trace_id))
        rating = client.post(f"{url}/mlflow/feedback", json={"trace_id": trace_id, "value": True},
                             headers={"X-Feedback-Token": token})  # fmt: skip
        assert rating.status_code == 202, rating.text
        body = rating.json()
        assert body["status"] == "spooled" and spooled(files, "feedback", body["spool_id"])
        assert find_traces(f"attributes.client_request_id = '{request_id}'", expected=1, timeout=1) == []
        # A process that sent the entry and died before removing it: the spool sends it again.
        entry = next(entry for entry in files.list("traces") if entry.key == trace_id)
        payload = files.read(entry)
        assert payload is not None
        assert _exporter.deliver_trace(_exporter.parse_trace(payload["trace"])) is None
    wait_for(
        lambda: not spooled(files, "traces", trace_id) and not spooled(files, "feedback", body["spool_id"])
    )
    found = find_traces(f"attributes.client_request_id = '{request_id}'", expected=1)
    assert [trace.info.trace_id for trace in found] == [trace_id]  # once, not twice
    trace = get_trace(trace_id)
    assert trace.info.trace_metadata["mlflow.trace.session"] == "s-spool"
    spans = trace.data.spans
    assert len({span.span_id for span in spans}) == len(spans) and len(spans) >= 2  # the app's span too
    wait_for(lambda: any(a.name == "user_feedback" for a in get_trace(trace_id).info.assessments))
    feedback = [a for a in get_trace(trace_id).info.assessments if a.name == "user_feedback"]
    assert len(feedback) == 1 and feedback[0].value is True
    after = export_stats()
    assert after.replayed_traces > before.replayed_traces and after.spooled_feedback > before.spooled_feedback


def test_corrupt_entries_are_skipped_and_counted(served: tuple[str, str]) -> None:
    _, url = served
    request_id = f"corrupt-{uuid.uuid4().hex[:12]}"
    before = export_stats().corrupt_entries
    with taken_for_down() as files:
        stamp = f"{time.time_ns() - 10**9:020d}"  # older than the good entry: read first
        bad = {
            f"{stamp}-tr-{'0' * 32}.json": b'{"format": 1, "kind": "traces", "trace": {"info"',  # torn
            f"{stamp}-tr-{'1' * 32}.json": b"\x00\xff not json",
            f"{stamp}-tr-{'2' * 32}.json": json.dumps({"format": 1, "kind": "traces", "trace": {}}).encode(),
            f"{stamp}-{'3' * 32}.json": json.dumps(
                {"format": 1, "kind": "feedback", "rating": {"x": 1}}
            ).encode(),
        }
        for name, data in bad.items():
            kind = "feedback" if "-tr-" not in name else "traces"
            (files.directory / kind / name).write_bytes(data)
        response = httpx.get(f"{url}/items/3", headers={"X-Request-ID": request_id}, timeout=30)
        assert response.status_code == 200
        wait_for(lambda: spooled(files, "traces", response.headers["X-Trace-ID"]))  # behind the bad ones
    found = find_traces(f"attributes.client_request_id = '{request_id}'", expected=1)
    assert len(found) == 1
    wait_for(lambda: not any((files.directory / k / n).exists() for n in bad for k in ("traces", "feedback")))
    assert export_stats().corrupt_entries - before == len(bad)


# --- the files alone ------------------------------------------------------------------------------


def test_bounds_drop_the_oldest_entries(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path / "spool", max_bytes=1024 * 1024, max_age=3600, fsync=False)
    assert files.open()
    blob = "x" * 100_000
    names = [files.write("traces", f"tr-{i:032x}", {"trace": blob}) for i in range(15)]
    assert all(names) and files.over_bound()
    old = files.directory / "feedback" / f"{time.time_ns() - 7200 * 10**9:020d}-{'a' * 32}.json"
    old.write_text(json.dumps({"format": 1, "kind": "feedback", "rating": {}}))
    files.scan()
    left = [entry.name for entry in files.list("traces")]
    assert left == names[-len(left) :] and 0 < len(left) < 15  # the newest kept, in order
    assert files.bytes <= files.max_bytes and not old.exists()
    assert files.counts["expired"] == 15 - len(left) + 1


def test_entries_are_whole_or_absent_and_stale_partial_writes_are_cleared(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path / "spool", max_bytes=10 * 1024 * 1024, max_age=3600, fsync=True)
    assert files.open()
    name = files.write("traces", f"tr-{'b' * 32}", {"trace": {"n": 1}})
    assert name is not None and list((files.directory / "tmp").iterdir()) == []
    (entry,) = files.list("traces")
    assert files.read(entry) == {"format": 1, "kind": "traces", "trace": {"n": 1}}
    stale = files.directory / "tmp" / "died-mid-write.123"
    stale.write_bytes(b"{")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    files.scan()
    assert not stale.exists() and files.entries == 1


def test_an_unwritable_spool_counts_and_drops(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert not SpoolFiles(blocker / "spool", max_bytes=2**20, max_age=60, fsync=False).open()
    files = SpoolFiles(tmp_path / "spool", max_bytes=2**20, max_age=60, fsync=False)
    assert files.open()
    (files.directory / "traces").rmdir()
    (files.directory / "traces").write_text("the disk went bad")
    threads = [threading.Thread(target=files.write, args=("traces", f"tr-{i:032x}", {})) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert files.counts["unwritable"] == 5 and files.counts["written"] == 0
    assert list((files.directory / "tmp").iterdir()) == []


# --- MLflow's export queue full: spooled, not dropped -------------------------------------------

OVERFLOW_SCRIPT = """
import json, sys, time
import mlflow
from mlflow_ctx_mw import _mlflow, export_stats, Options
from mlflow_ctx_mw.span import prepare

mlflow.set_experiment(sys.argv[1])
prepare(Options(feedback_path=None, spool_replay_per_second=100))
for i in range(60):  # far faster than one export worker sends them
    span = _mlflow.start_root_span("GET /", metadata={}, tags={}, client_request_id=f"{sys.argv[2]}-{i}")
    _mlflow.end_span(span, name="GET /", attributes={}, status_code=200, error=None)
mlflow.flush_trace_async_logging()
deadline = time.monotonic() + 120
while export_stats().spool_entries and time.monotonic() < deadline:
    time.sleep(0.2)
print(json.dumps(export_stats().__dict__))
"""


def test_traces_a_full_export_queue_refuses_are_spooled_and_sent(mlflow_server: str, tmp_path: Path) -> None:
    """MLflow's queue of 2 tasks and one worker against 60 traces at once: without the spool most
    are dropped (test_production.py); with it, each arrives once."""
    run = f"overflow-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE": "2",
        "MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS": "1",
        "MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS": "5000",  # the 60 reach the queue at once
        "MLFLOW_CTX_SPOOL_DIR": str(tmp_path / "spool"),
    }
    command = [sys.executable, "-c", OVERFLOW_SCRIPT, EXPERIMENT, run]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["spooled_traces"] > 0 and stats["replayed_traces"] == stats["spooled_traces"]
    assert stats["dropped_exports"] == 0 and stats["spool_entries"] == 0
    found = find_traces(f"attributes.client_request_id LIKE '{run}-%'", expected=60)
    assert sorted(trace.info.client_request_id for trace in found) == sorted(f"{run}-{i}" for i in range(60))


def test_an_entry_that_keeps_failing_is_dropped_once_others_get_through(tmp_path: Path) -> None:
    """The replay policy alone (no MLflow: nothing here claims a trace landed). A server that
    fails one entry every time while it takes the others: that entry is the problem, not the
    server; it must not hold the spool (or the outage state) forever."""
    from mlflow_ctx_mw import replay

    spooler = replay._Spooler()
    spooler.files = SpoolFiles(tmp_path / "spool", max_bytes=2**20, max_age=3600, fsync=False)
    assert spooler.files.open()
    poison = spooler.files.write("traces", f"tr-{'f' * 32}", {"trace": {}})
    for i in range(3):
        spooler.files.write("traces", f"tr-{i:032x}", {"trace": {}})
    sent: list[str] = []

    def send(entry: object) -> str:
        if entry.name == poison:  # type: ignore[attr-defined]
            return "down"
        sent.append(entry.name)  # type: ignore[attr-defined]
        spooler.files.remove(entry)  # type: ignore[union-attr, arg-type]
        return "sent"

    spooler._send_trace = send  # type: ignore[method-assign]
    spooler.rate = 10_000
    for _ in range(replay.SUSPECT_AFTER):  # the poison entry is oldest: each round stops on it
        spooler._replay()
        assert spooler.down and sent == []
    spooler._replay()  # now skipped: the others go, and it is dropped
    assert len(sent) == 3 and spooler.files.list("traces") == [] and not spooler.down
    assert spooler.counts["rejected"] == 1


def test_a_rating_waits_without_its_clock_while_traces_are_ahead_of_it(tmp_path: Path) -> None:
    """The replay order alone (no MLflow). A spool longer than a rating may wait for its trace
    (1,100 traces at 20/s outlast feedback_wait_seconds' 60 s): the rating is tried only once no
    batch of traces is ahead of it, so its own trace, spooled last, is stored first."""
    from mlflow_ctx_mw import replay

    spooler = replay._Spooler()
    spooler.files = SpoolFiles(tmp_path / "spool", max_bytes=2**24, max_age=3600, fsync=False)
    assert spooler.files.open()
    keys = [f"tr-{i:032x}" for i in range(replay.REPLAY_BATCH * 2 + 5)]
    for key in keys:
        spooler.files.write("traces", key, {"trace": {}})
    spooler.files.write("feedback", "a" * 32, {"rating": {"trace_id": keys[-1]}})
    stored: list[str] = []
    tried: list[bool] = []  # for each try of the rating: was its trace stored by then?

    def send_trace(entry: object) -> str:
        stored.append(entry.key)  # type: ignore[attr-defined]
        spooler.files.remove(entry)  # type: ignore[union-attr, arg-type]
        return "sent"

    def send_rating(entry: object) -> str:
        tried.append(keys[-1] in stored)
        if not tried[-1]:
            return "missing"
        spooler.files.remove(entry)  # type: ignore[union-attr, arg-type]
        return "sent"

    spooler._send_trace = send_trace  # type: ignore[method-assign]
    spooler._send_rating = send_rating  # type: ignore[method-assign]
    spooler.rate = 10_000
    rounds = 0
    while spooler._replay():
        rounds += 1
        assert rounds < 10
    assert stored == keys and tried == [True]
    assert spooler.files.list("traces") == [] and spooler.files.list("feedback") == []
