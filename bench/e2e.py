"""End to end: requests/s and latency of hello-world apps under real servers, bare vs ours.

    python bench/e2e.py [--seconds 10] [--rounds 3] [--connections 16] [--targets fastapi,flask]

Each target (FastAPI under uvicorn, Flask under gunicorn, Django under gunicorn and uvicorn; one
worker each) is started fresh per measurement, warmed up, then loaded by `wrk` (Debian's package)
from a second process on loopback; variants alternate (bare, ours, bare, ours ...) and the figures
are medians over rounds. Traces go to a live local MLflow server with async export on; each
measurement starts once the server has stopped ingesting the previous app's traces. On a
machine with 2+ cores the app is pinned to core 0 and wrk + the MLflow server to the others, so
the app's figures are its own CPU. Also reported per run: traces the server stored per second,
and the app's garbage collections (young/middle/full) with their pauses, the tail latency's
main cause. `--gc-freeze` makes the apps call gc.freeze() after start-up. Prints a table;
writes bench/results/e2e-*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from mlflow_ctx_mw.testing import free_port, local_mlflow_server, stopping, wait_http

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = {
    "fastapi-uvicorn": ("fastapi", ["uvicorn", "e2e_apps:fastapi_app"]),
    "flask-gunicorn": ("flask", ["gunicorn", "e2e_apps:flask_app"]),
    "django-gunicorn": ("django-wsgi", ["gunicorn", "e2e_apps:django_wsgi"]),
    "django-uvicorn": ("django-asgi", ["uvicorn", "e2e_apps:django_asgi"]),
}
VARIANTS = ("bare", "ours")
EXTRA_VARIANTS = {"fastapi-uvicorn": ("floor",)}  # MLflow's own minimum, for scale
# What a chat client sends; the floor variant needs all three.
HEADERS = ["-H", "X-Request-ID: bench-1", "-H", "X-Session-ID: s-1", "-H", "X-User-ID: u-1"]
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def variants(target: str) -> tuple[str, ...]:
    return VARIANTS + EXTRA_VARIANTS.get(target, ())


def server_command(server: str, app: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--workers", "1",
                "--no-access-log", "--log-level", "warning"]  # fmt: skip
    return [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}", "--workers", "1",
            "--threads", "8", "--log-level", "warning"]  # fmt: skip


def wrk(url: str, seconds: float, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", *HEADERS, url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    latency = {
        pct: float(value) * _UNITS[unit]
        for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def measure(target: str, variant: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    kind, (server, app) = TARGETS[target][0], TARGETS[target][1]
    settle(args.store)
    port = free_port()
    command = server_command(server, app, port)
    if args.pin:
        command = ["taskset", "-c", "0", *command]
    env = {**env, "BENCH_TARGET": kind, "BENCH_VARIANT": variant, "BENCH_OPTIONS": args.ours_options,
           "BENCH_GC_FREEZE": "1" if args.gc_freeze else "0"}  # fmt: skip
    log = Path(tempfile.gettempdir()) / f"bench-e2e-{target}-{variant}.log"  # a pipe could fill and block
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT)
    with stopping(proc):
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/_stats", proc=proc, timeout=60)
        wrk(f"{base}/hello", args.warmup, args.connections)
        urllib.request.urlopen(f"{base}/_stats", timeout=10).close()  # GC figures from here on
        before = landed(args.store)
        figures: dict[str, Any] = wrk(f"{base}/hello", args.seconds, args.connections)
        figures["landed_per_s"] = (landed(args.store) - before) / args.seconds
        with urllib.request.urlopen(f"{base}/_stats", timeout=10) as response:
            figures["export_stats"] = json.load(response)
    return figures


def gc_summary(figures: dict[str, Any]) -> str:
    gc = figures["export_stats"]["gc"]
    counts = "/".join(str(n) for n in gc["collections"])
    return f"{counts} full {gc['pause_ms'][2]:.0f} ms longest {gc['longest_ms']:.0f} ms"


def settle(store: Path, quiet: float = 1.0, limit: float = 120.0) -> None:
    """Wait until the server stops ingesting the last app's traces: it shares a core with wrk."""
    deadline = time.monotonic() + limit
    last = landed(store)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = landed(store)
        if now == last:
            return
        last = now


def landed(store: Path) -> int:
    """Traces the tracking server has stored so far: the export work the app's process did."""
    with contextlib.closing(sqlite3.connect(store / "mlflow.db", timeout=30)) as db:
        return int(db.execute("SELECT COUNT(*) FROM trace_info").fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--ours-options", default="{}", help='JSON, e.g. {"expose_headers": false}')
    parser.add_argument("--gc-freeze", action="store_true", help="apps call gc.freeze() after start-up")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("needs wrk: apt-get install wrk")
    targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    args.pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if args.pin:  # the MLflow server and wrk (children of this process) stay off the app's core
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))

    import mlflow

    samples: dict[str, dict[str, list[dict[str, Any]]]] = {t: {v: [] for v in variants(t)} for t in targets}
    args.store = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    with local_mlflow_server(args.store) as url:
        mlflow.set_tracking_uri(url)
        experiment_id = mlflow.set_experiment("e2e").experiment_id
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_ID": experiment_id}
        for round_no in range(args.rounds):
            for target in targets:
                for variant in variants(target):
                    figures = measure(target, variant, args, env)
                    samples[target][variant].append(figures)
                    print(
                        f"round {round_no + 1} {target:<16} {variant:<5} {figures['rps']:>9.0f} rps "
                        f"p50 {figures['p50_ms']:.2f} ms p99 {figures['p99_ms']:.2f} ms "
                        f"landed {figures['landed_per_s']:.0f}/s gc {gc_summary(figures)}",
                        flush=True,
                    )
    report(args, targets, samples)


def report(args: argparse.Namespace, targets: list[str], samples: dict[str, Any]) -> None:
    import mlflow

    table: dict[str, dict[str, dict[str, float]]] = {}
    print(f"\n{'target':<18}{'variant':<8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs bare':>9}"
          f"{'landed/s':>10}")  # fmt: skip
    for target in targets:
        table[target] = {}
        for variant in variants(target):
            runs = samples[target][variant]
            table[target][variant] = {
                key: statistics.median(run[key] for run in runs)
                for key in ("rps", "p50_ms", "p99_ms", "landed_per_s")
            }
            for lost in ("dropped_exports", "evicted_traces"):
                table[target][variant][lost] = max(run["export_stats"].get(lost, 0) for run in runs)
        bare = table[target]["bare"]["rps"]
        for variant in variants(target):
            row = table[target][variant]
            print(f"{target:<18}{variant:<8}{row['rps']:>10.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                  f"{row['rps'] / bare:>9.0%}{row['landed_per_s']:>10.0f}")  # fmt: skip
    result = {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
              "mlflow": mlflow.__version__, "pinned": args.pin, "seconds": args.seconds,
              "rounds": args.rounds, "connections": args.connections, "ours_options": args.ours_options,
              "gc_freeze": args.gc_freeze,
              "results": table}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"e2e-{int(time.time())}.json").write_text(json.dumps(result, indent=2))
    sys.stdout.flush()
    os._exit(0)  # the app servers are stopped; skip flushing what this process never traced


if __name__ == "__main__":
    main()
