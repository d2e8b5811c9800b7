"""A plain route's latency while the feedback endpoint is flooded with ratings of unknown traces.

    python bench/feedback_flood.py [--servers gunicorn-sync,waitress,uvicorn] [--seconds 10]
                                   [--posters 8] [--policy open] [--tree DIR]

Each server runs the test app (tests/served.py) in its own process against a local MLflow server
(SQLite): gunicorn with 2 sync workers (Flask), waitress with 4 threads (Flask), uvicorn
(FastAPI). One client measures GET /items/1 back to back, first alone, then while `--posters`
clients post feedback on random, never-served trace ids as fast as the endpoint answers. The
policy is "open" by default, the worst case (the ratings are accepted and queued); with "token"
they are refused at the signature. `--tree` runs another checkout of this repository (e.g. the
previous release, with `git worktree add /tmp/old <commit>`), whose own tests/served.py is used.
Writes bench/results/flood-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
from mlflow_ctx_mw.testing import free_port, local_mlflow_server, stopping, wait_http  # noqa: E402

SERVERS = {
    "gunicorn-sync": lambda port: ["-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "served:flask()"],
    "waitress": lambda port: [
        "-m",
        "waitress",
        "--threads=4",
        f"--listen=127.0.0.1:{port}",
        "--call",
        "served:flask",
    ],
    "uvicorn": lambda port: ["-m", "uvicorn", "--factory", "served:fastapi", "--port", str(port)],
}


def measure(url: str, seconds: float) -> list[float]:
    latencies = []
    with httpx.Client(timeout=60) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            client.get(url + "/items/1")
            latencies.append((time.perf_counter() - start) * 1000)
    return latencies


def flood(url: str, stop: threading.Event, seen: Counter[str]) -> None:
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            body = {"trace_id": f"tr-{uuid.uuid4().hex}", "value": True}
            try:
                status = client.post(url + "/mlflow/feedback", json=body).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            seen[str(status)] += 1


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return {"requests": len(ordered), "p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(p99, 2), "max_ms": round(ordered[-1], 2)}  # fmt: skip


def run(server: str, tree: Path, tracking: str, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "MLFLOW_CTX_EXPERIMENT_ID": "0",
           "PYTHONPATH": os.pathsep.join([str(tree / "tests"), str(tree / "src")]),
           "MLFLOW_CTX_FEEDBACK_SECRET": "bench-feedback-secret-0123456789",
           "MLFLOW_CTX_OPTIONS": json.dumps({"feedback_auth": args.policy})}  # fmt: skip
    log = (workdir / f"{server}.log").open("wb")
    proc = subprocess.Popen([sys.executable, *SERVERS[server](port)], cwd=tree / "tests", env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    with stopping(proc):
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/items/0", proc=proc, timeout=60)
        measure(url, 1)  # warm-up
        alone = summary(measure(url, args.seconds))
        stop, seen = threading.Event(), Counter[str]()
        posters = [threading.Thread(target=flood, args=(url, stop, seen)) for _ in range(args.posters)]
        for poster in posters:
            poster.start()
        time.sleep(1)
        flooded = summary(measure(url, args.seconds))
        stop.set()
        for poster in posters:
            poster.join()
    log.close()
    return {"alone": alone, "flooded": flooded, "feedback_answers": dict(seen)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--posters", type=int, default=8)
    parser.add_argument("--policy", default="open")
    parser.add_argument("--tree", type=Path, default=ROOT)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp,
        local_mlflow_server(Path(tmp) / "mlflow") as uri,
    ):
        print(f"{'server':<16}{'alone p50/p99 ms':>20}{'flooded p50/p99/max ms':>28}  feedback answers")
        for server in args.servers.split(","):
            result = run(server, args.tree.resolve(), uri, args, Path(tmp))
            alone, flooded = result["alone"], result["flooded"]
            print(f"{server:<16}{alone['p50_ms']:>9} / {alone['p99_ms']:<8}"  # type: ignore[index]
                  f"{flooded['p50_ms']:>10} / {flooded['p99_ms']} / {flooded['max_ms']:<8}"  # type: ignore[index]
                  f"  {result['feedback_answers']}", flush=True)  # fmt: skip
            results[server] = result
    git = ["git", "-C", str(args.tree), "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    report = {"tree": str(args.tree), "commit": commit, "policy": args.policy, "posters": args.posters,
              "seconds": args.seconds, "results": results}  # fmt: skip
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"flood-{int(time.time())}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
