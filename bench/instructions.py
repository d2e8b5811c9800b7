"""Instructions per request, counted by valgrind's callgrind: repeatable where timings are not.

    python bench/instructions.py [--variants bare,floor,ours] [--requests 300]
    python bench/instructions.py --variants "wsgi floor,wsgi ours"
    python bench/instructions.py --variants "floor,ours" --python .compat/bench-lean/bin/python

`--python` runs the app under another interpreter, e.g. a venv with the lean `mlflow-tracing`
and no full `mlflow` (`make bench-lean-venv`); compare against the same Python version only.

Each variant of bench/overhead.py's apps (ASGI; WSGI as "wsgi <name>") runs in its own process under
`valgrind --tool=callgrind --instr-atstart=no`; counting is switched on (callgrind_control) only
around two runs of N and 2N requests, and the figure is (count(2N) - count(N)) / N, so start-up
and warm-up cancel out. Two parts are counted apart: the request path (MLflow's batch processor
is held back meanwhile, so its thread does not run) and the export (the flush that follows: the
batch processor and MLflow's exporter build and queue every trace as usual; only the exporter's
two network calls are skipped, their HTTP work being the same for all variants). Needs Debian's
valgrind. Writes bench/results/instr-*.json.
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
run = overhead.runner_for({variant!r})
marks = {marks!r}
run(200)
mlflow.flush_trace_async_logging()
gc.collect()
open(marks + ".ready", "w").close()
while not os.path.exists(marks + ".go"):
    time.sleep(0.05)
run({requests})
open(marks + ".ran", "w").close()
while not os.path.exists(marks + ".flush"):
    time.sleep(0.05)
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


def count(variant: str, requests: int, uri: str, workdir: Path, python: str) -> tuple[int, int]:
    """Instructions of (the requests, the export that follows), all threads."""
    marks = workdir / f"{variant}-{requests}"
    out = workdir / f"callgrind.{variant}.{requests}"
    code = CHILD.format(here=str(HERE), uri=uri, variant=variant, marks=str(marks), requests=requests)
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
               python, "-c", code]  # fmt: skip
    held_back = str(10 * requests)  # no batch is due while the requests run; nothing is evicted
    env = {**os.environ, "MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE": "1000000",
           "MLFLOW_ASYNC_TRACE_LOGGING_MAX_SPAN_BATCH_SIZE": held_back,
           "MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS": "3600000",
           "MLFLOW_TRACE_BUFFER_MAX_SIZE": held_back}  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(proc.pid)], capture_output=True, check=True)

    try:
        wait_for(marks.with_suffix(".ready"), proc)
        control("-i", "on")
        marks.with_suffix(".go").touch()
        wait_for(marks.with_suffix(".ran"), proc)
        control("-d", "requests")  # dump and zero: the first part is the request path
        marks.with_suffix(".flush").touch()
        wait_for(marks.with_suffix(".done"), proc)
        control("-i", "off")
        marks.with_suffix(".stop").touch()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    parts: dict[bool, int] = {True: 0, False: 0}
    for part in workdir.glob(f"callgrind.{variant}.{requests}*"):
        text = part.read_text(errors="replace")
        match = re.search(r"^totals:\s+(\d+)", text, re.M)
        request_path = bool(re.search(r"^desc: Trigger: .*requests", text, re.M))
        parts[request_path] += int(match.group(1)) if match else 0
    return parts[True], parts[False]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="bare,floor,otel,ours")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--python", default=sys.executable, help="the app's interpreter (default: this one)")
    args = parser.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        sys.exit("needs valgrind: apt-get install valgrind")
    from mlflow_ctx_mw.testing import local_mlflow_server

    workdir = Path(tempfile.mkdtemp(prefix="bench-instr-"))
    per_request: dict[str, float] = {}
    split: dict[str, dict[str, float]] = {}
    print(f"{'instructions/request':<28}{'total':>14}{'request path':>14}{'export':>12}")
    with local_mlflow_server(workdir / "mlflow") as uri:
        for variant in args.variants.split(","):
            once = count(variant, args.requests, uri, workdir, args.python)
            twice = count(variant, 2 * args.requests, uri, workdir, args.python)
            path, export = ((b - a) / args.requests for a, b in zip(once, twice, strict=True))
            per_request[variant] = path + export
            split[variant] = {"request_path": path, "export": export}
            print(f"{variant:<28}{path + export:>14,.0f}{path:>14,.0f}{export:>12,.0f}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    for variant, value in per_request.items():  # each against its own kind's floor
        kind = variant.split(" ")[0] + " " if " " in variant else ""
        floor = f"{kind}floor" if f"{kind}floor" in split else None
        if floor is not None:
            ratio = split[variant]["request_path"] / split[floor]["request_path"]
            total = value / per_request[floor]
            print(f"{variant:<28}{total:>8.3f} x {floor} ({ratio:.3f} x on the request path)")
    RESULTS.mkdir(exist_ok=True)
    probe = (
        "import sys, importlib.metadata as m, importlib.util as u; print(sys.version.split()[0], "
        "m.version('mlflow-tracing'), u.find_spec('mlflow.server') is None)"
    )
    version, tracing, lean = subprocess.run([args.python, "-c", probe], capture_output=True, text=True,
                                            check=True).stdout.split()  # fmt: skip
    print(f"app: Python {version}, mlflow-tracing {tracing}, {'lean' if lean == 'True' else 'full'} install")
    report = {"python": version, "mlflow_tracing": tracing, "install": "lean" if lean == "True" else "full",
              "requests": args.requests, "per_request": per_request, "split": split}  # fmt: skip
    (RESULTS / f"instr-{int(time.time())}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
