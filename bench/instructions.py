"""Instructions per request, counted by valgrind's callgrind: repeatable where timings are not.

    python bench/instructions.py [--variants bare,floor,ours] [--requests 300]

Each variant of bench/overhead.py's ASGI app runs in its own process under
`valgrind --tool=callgrind --instr-atstart=no`; counting is switched on (callgrind_control) only
around two runs of N and 2N requests, and the figure is (count(2N) - count(N)) / N, so start-up
and warm-up cancel out. MLflow builds, processes and queues every trace as usual; only the two
network calls of its exporter are skipped, so that the exporter threads' HTTP work (identical for
all variants) does not blur the count. Needs Debian's valgrind. Writes bench/results/instr-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Runs inside valgrind: warm up, then one measured burst between two marker files.
CHILD = """
import os, sys, time, gc
sys.path.insert(0, {here!r})
import overhead, mlflow
from mlflow.tracing.export.mlflow_v3 import MlflowV3SpanExporter
MlflowV3SpanExporter._log_trace = lambda self, *a, **k: None
MlflowV3SpanExporter._log_spans = lambda self, *a, **k: None
mlflow.set_tracking_uri({uri!r})
mlflow.set_experiment("instructions")
app, path = overhead.asgi_variants()[{variant!r}]
run = overhead.asgi_runner(app, path)
marks = {marks!r}
run(200)
mlflow.flush_trace_async_logging()
gc.collect()
open(marks + ".ready", "w").close()
while not os.path.exists(marks + ".go"):
    time.sleep(0.05)
run({requests})
mlflow.flush_trace_async_logging()
open(marks + ".done", "w").close()
while not os.path.exists(marks + ".stop"):
    time.sleep(0.05)
os._exit(0)
"""


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"valgrind run exited early with code {proc.returncode}")
        time.sleep(0.2)


def count(variant: str, requests: int, uri: str, workdir: Path) -> int:
    marks = workdir / f"{variant}-{requests}"
    out = workdir / f"callgrind.{variant}.{requests}"
    code = CHILD.format(here=str(HERE), uri=uri, variant=variant, marks=str(marks), requests=requests)
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, "-c", code]  # fmt: skip
    env = {**os.environ, "MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE": "1000000"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(marks.with_suffix(".ready"), proc)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], capture_output=True, check=True)
        marks.with_suffix(".go").touch()
        wait_for(marks.with_suffix(".done"), proc)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], capture_output=True, check=True)
        marks.with_suffix(".stop").touch()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    total = 0
    for part in workdir.glob(f"callgrind.{variant}.{requests}*"):
        match = re.search(r"^totals:\s+(\d+)", part.read_text(errors="replace"), re.M)
        total += int(match.group(1)) if match else 0
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="bare,floor,otel,ours")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        sys.exit("needs valgrind: apt-get install valgrind")
    from mlflow_ctx_mw.testing import local_mlflow_server

    workdir = Path(tempfile.mkdtemp(prefix="bench-instr-"))
    per_request: dict[str, float] = {}
    with local_mlflow_server(workdir / "mlflow") as uri:
        for variant in args.variants.split(","):
            once = count(variant, args.requests, uri, workdir)
            twice = count(variant, 2 * args.requests, uri, workdir)
            per_request[variant] = (twice - once) / args.requests
            print(f"{variant:<28}{per_request[variant]:>14,.0f} instructions/request", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    floor = per_request.get("floor")
    if floor:
        for variant, value in per_request.items():
            print(f"{variant:<28}{value / floor:>8.3f} x floor")
    RESULTS.mkdir(exist_ok=True)
    report = {"python": sys.version.split()[0], "requests": args.requests, "per_request": per_request}
    (RESULTS / f"instr-{int(time.time())}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
