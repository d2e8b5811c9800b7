"""How fast `mlflow-ctx report` reads a production-sized experiment, and how much memory it takes.

    python bench/analytics.py --store sqlite --traces 10000 --workdir /tmp/analytics-10k
    python bench/analytics.py --store postgres --traces 10000

Seeds a fresh `mlflow server` (SQLite, or PostgreSQL started here as in bench/ingest.py) with
traces made through the ASGI middleware (tests/traffic.py: users, sessions, three builds, three
routes, errors, token usage and cost, a quarter rated through the feedback endpoint), then runs the
CLI as users do, once per output, timing each run and reading its peak RSS. A SQLite workdir that
already holds the traces is reused (seeding runs at the server's ingest rate, ~30 traces/s here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from ingest import server  # noqa: E402

RESULTS = HERE / "results"
EXPERIMENT = "analytics-bench"
CLI = [sys.executable, "-m", "mlflow_ctx_mw.cli", "report", "--experiment", EXPERIMENT, "--since", "30d"]
RUNS = {
    "table --by user": ["--by", "user"],
    "json --by app_version": ["--by", "app_version", "--format", "json"],
    "csv --by session": ["--by", "session", "--format", "csv"],
    "html": ["--by", "route", "--html", "{dir}/report.html"],
    "server-side --by route": ["--by", "route", "--server-side"],
}


def seeded(url: str) -> int:
    from mlflow_ctx_mw import analytics

    try:
        return len(analytics.fetch(EXPERIMENT, tracking_uri=url))
    except LookupError:
        return 0


def seed(url: str, traces: int) -> float:
    import mlflow

    import traffic

    os.environ.setdefault("MLFLOW_CTX_FEEDBACK_SECRET", "bench-" + "s" * 32)
    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(EXPERIMENT)
    start = time.monotonic()
    done = 0
    while done < traces:  # in chunks, so memory stays flat at 100,000
        chunk = min(5000, traces - done)
        asyncio.run(traffic.drive(chunk, seed=done, users=500, tag=f"b{done}"))
        done += chunk
        print(f"seeded {done}/{traces} in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    mlflow.flush_trace_async_logging()
    return time.monotonic() - start


def timed(command: list[str], env: dict[str, str]) -> dict[str, object]:
    """One CLI run: wall time and the peak RSS of that process alone (measured by a parent of
    its own, whose only child it is)."""
    probe = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)"
        ".returncode; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
    )
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", probe, *command], env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(int(out.stdout.split()[-1]) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--traces", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, help="keep the SQLite store here (reused when seeded)")
    parser.add_argument("--server-workers", type=int, default=1)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="analytics-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with server(args.store, args.server_workers, workdir) as url:
        have = seeded(url)
        seconds = seed(url, args.traces - have) if have < args.traces else 0.0
        env = {**os.environ, "MLFLOW_TRACKING_URI": url}
        runs = {}
        for name, extra in RUNS.items():
            runs[name] = timed([*CLI, *(a.format(dir=workdir) for a in extra)], env)
            print(name, runs[name], file=sys.stderr, flush=True)
    result = {
        "store": args.store, "traces": max(have, args.traces), "seed_seconds": round(seconds, 1),
        "server_workers": args.server_workers, "runs": runs,
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"analytics-{args.store}-{result['traces']}-{int(time.time())}.json").write_text(
        json.dumps(result, indent=2)
    )


if __name__ == "__main__":
    main()
