"""What the spool costs, and what its replay does to a recovering tracking server.

    python bench/spool.py [--requests 1000] [--backlog 400] [--rates 20,1000] [--parts path,replay,files]

1. The request path: the FastAPI test app (tests/served.py) under uvicorn, twice, with the spool
   on and off, against a real `mlflow server` (SQLite) that is up, then stopped; the same GET to
   both, interleaved so that both see the same machine noise. Latency per request and the app
   process's CPU time per request (the spool's own work is off the request path, not free).
2. The replay: a backlog of traces spooled while the server was down; the server started again;
   how fast the spool drains at each `spool_replay_per_second`, and the server's latency for an
   ordinary call (get-experiment-by-name) while it does, against the same server idle.
3. One entry's write on this disk, without and with `spool_fsync`.

Writes bench/results/spool-*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
from servers import served_app  # noqa: E402
from test_outage import TrackingServer, outage_env, spool_entries  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
#: The test suite's speed-ups (conftest.py), not what an app runs with.
TEST_ONLY = ("MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")


def app_env(tracking: TrackingServer, spool: Path, name: str, options: dict[str, object]) -> dict[str, str]:
    env = {**outage_env(tracking, spool, name), "MLFLOW_CTX_OPTIONS": json.dumps(options)}
    return {key: value for key, value in env.items() if key not in TEST_ONLY}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def ms(values: list[float], q: int) -> float:
    return round(statistics.quantiles(values, n=100)[q - 1] * 1000, 3)


def timed_get(client: httpx.Client, url: str, i: int) -> float:
    start = time.perf_counter()
    response = client.get(f"{url}/items/{i}", headers={"X-User-ID": "bench", "X-Session-ID": f"s{i}"})
    assert response.status_code == 200, response.status_code
    return time.perf_counter() - start


def request_path(tmp: Path, requests: int) -> list[dict[str, object]]:
    tracking = TrackingServer(tmp / "mlflow")
    tracking.start()
    name = f"bench-{uuid.uuid4().hex[:6]}"
    rows = []
    try:
        on_env = app_env(tracking, tmp / "spool", name, {})
        off_env = app_env(tracking, tmp / "spool", name, {"spool": False})
        with (
            served_app("uvicorn, lifespan", on_env, tmp / "on.log") as (on_url, on_proc),
            served_app("uvicorn, lifespan", off_env, tmp / "off.log") as (off_url, off_proc),
            httpx.Client(timeout=60) as client,
        ):
            for state in ("up", "down"):
                if state == "down":
                    tracking.stop()
                for i in range(20):  # warm-up (and, when down, the failure that starts the outage)
                    timed_get(client, on_url, i)
                    timed_get(client, off_url, i)
                time.sleep(2)
                on, off = [], []
                cpu = {"on": cpu_seconds(on_proc.pid), "off": cpu_seconds(off_proc.pid)}
                for i in range(requests):
                    on.append(timed_get(client, on_url, i))
                    off.append(timed_get(client, off_url, i))
                time.sleep(2)  # the background work those requests caused
                used = {
                    "on": cpu_seconds(on_proc.pid) - cpu["on"],
                    "off": cpu_seconds(off_proc.pid) - cpu["off"],
                }
                for spool, values in (("on", on), ("off", off)):
                    quantiles = {f"p{q}_ms": ms(values, q) for q in (50, 95, 99)}
                    cpu_ms = round(used[spool] / requests * 1000, 3)
                    rows.append({"server": state, "spool": spool, **quantiles, "cpu_ms_per_request": cpu_ms})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        tracking.stop()
    return rows


def probe_latencies(url: str, name: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
            out.append(time.perf_counter() - start)
            stop.wait(0.1)


def replay(tmp: Path, backlog: int, rate: float) -> dict[str, object]:
    tracking = TrackingServer(tmp / f"mlflow-{rate:g}")
    tracking.start()
    name = f"replay-{uuid.uuid4().hex[:6]}"
    spool = tmp / f"spool-{rate:g}"
    env = app_env(tracking, spool, name, {"spool_replay_per_second": rate})
    try:
        with (
            served_app("uvicorn, lifespan", env, tmp / f"replay-{rate:g}.log") as (url, _),
            httpx.Client() as client,
        ):
            idle: list[float] = []
            stop = threading.Event()
            probe_latencies_for(tracking.url, name, stop, idle, seconds=5)
            tracking.stop()
            for i in range(backlog):
                timed_get(client, url, i)
            deadline = time.monotonic() + 60
            while spool_entries(spool) < backlog and time.monotonic() < deadline:
                time.sleep(0.2)
            spooled = spool_entries(spool)
            tracking.start()
            busy: list[float] = []
            stop = threading.Event()
            prober = threading.Thread(target=probe_latencies, args=(tracking.url, name, stop, busy))
            start = time.monotonic()
            prober.start()
            first = None  # the probe's backoff (up to 30 s) is not the replay rate
            while (left := spool_entries(spool)) and time.monotonic() - start < 900:
                if first is None and left < spooled:
                    first = time.monotonic()
                time.sleep(0.05)
            drained = time.monotonic() - start
            replaying = time.monotonic() - (first or start)
            stop.set()
            prober.join()
        stored = len(tracking.traces(name, "bench"))
    finally:
        tracking.stop()
    row = {"rate_limit": rate, "spooled": spooled, "stored": stored, "drain_seconds": round(drained, 1),
           "first_sent_after_seconds": round(drained - replaying, 1),
           "traces_per_second": round(spooled / replaying, 1), "idle_p50_ms": ms(idle, 50),
           "idle_p95_ms": ms(idle, 95), "replaying_p50_ms": ms(busy, 50),
           "replaying_p95_ms": ms(busy, 95)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def probe_latencies_for(url: str, name: str, stop: threading.Event, out: list[float], seconds: float) -> None:
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    probe_latencies(url, name, stop, out)


def entry_writes(tmp: Path, count: int = 500) -> list[dict[str, object]]:
    """One spool entry's write (bench/spool_entry.json: the test app's 2-span trace, 1.9 KB) on this disk,
    without and with fsync: the spool's worker pays it, not the request."""
    from mlflow_ctx_mw.spool import SpoolFiles

    sample = json.loads((ROOT / "bench" / "spool_entry.json").read_text())
    rows = []
    for fsync in (False, True):
        files = SpoolFiles(tmp / f"files-{fsync}", max_bytes=2**30, max_age=86400, fsync=fsync)
        assert files.open()
        took = []
        for i in range(count):
            start = time.perf_counter()
            assert files.write("traces", f"tr-{i:032x}", sample)
            took.append(time.perf_counter() - start)
        rows.append({"fsync": fsync, "p50_ms": ms(took, 50), "p95_ms": ms(took, 95), "p99_ms": ms(took, 99)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=400)
    parser.add_argument("--rates", default="20,1000")
    parser.add_argument("--parts", default="path,replay,files", help="path (the request path), replay, files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack():
        path_rows = request_path(Path(tmp), args.requests) if "path" in args.parts else []
        write_rows = entry_writes(Path(tmp)) if "files" in args.parts else []
        rates = args.rates.split(",") if "replay" in args.parts else []
        replay_rows = [replay(Path(tmp), args.backlog, float(rate)) for rate in rates]
    out = ROOT / "bench" / "results" / f"spool-{int(time.time())}.json"
    result = {"command": " ".join(["python bench/spool.py", *sys.argv[1:]]), "requests": args.requests,
              "backlog": args.backlog, "request_path": path_rows, "replay": replay_rows,
              "entry_writes": write_rows}  # fmt: skip
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
