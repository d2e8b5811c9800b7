"""The compatibility matrix (`make compat`): the integration core wherever users run the package.

    python tests/compat.py [--legs oldest,newest] [--no-sweep]

Each leg is a virtual environment of its own (under .compat/) holding this package, the test
tools, the frameworks and `mlflow-tracing` at the versions below, and NOT the full `mlflow`: the
tracking server runs from the Python that runs this script (the main venv, with the full
package), as in production. Every leg runs the core both ways users configure the experiment: in
code (`mlflow.set_experiment`) and only by MLFLOW_TRACKING_URI + MLFLOW_EXPERIMENT_NAME. The
"full" leg is the main venv itself configured by environment (`make test` is its code half).
Then the sweep: every other minor release in the declared range, swapped into one venv, a
smaller core against one shared server, alternating the two ways.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from mlflow_ctx_mw.testing import local_mlflow_server  # noqa: E402

VENVS = ROOT / ".compat"
CORE = [
    "tests/test_mlflow_contract.py",
    "tests/test_destination.py",
    "tests/test_integration.py",
    "tests/test_feedback.py",
    # SIGTERM after a burst: a server with lifespan, one without, and a threaded WSGI one.
    "tests/test_shutdown.py::test_sigterm_right_after_a_burst_loses_nothing[uvicorn, lifespan off]",
    "tests/test_shutdown.py::test_sigterm_right_after_a_burst_loses_nothing[uvicorn, Django ASGI]",
    "tests/test_shutdown.py::test_sigterm_right_after_a_burst_loses_nothing[gunicorn threaded]",
    "tests/test_protocol.py",
    "tests/test_startup.py",
    # The spool: a trace and a rating while down, sent once; a SIGKILLed process's spool (it
    # started during an outage: its experiment resolved at replay) sent by the next process.
    "tests/test_spool.py::test_a_request_and_its_rating_while_down_arrive_once_when_back",
    "tests/test_outage.py::test_a_killed_process_spool_is_sent_by_the_next_one",
    # The analytics and `mlflow-ctx report` on what this version stored (HTML: the full leg).
    "tests/test_analytics.py",
]
SWEEP_CORE = [
    "tests/test_mlflow_contract.py",
    "tests/test_integration.py",
    "tests/test_feedback.py::test_each_value_kind_lands_right_after_the_response",
    "tests/test_feedback.py::test_expectation_by_client_request_id",
    "tests/test_spool.py::test_a_request_and_its_rating_while_down_arrive_once_when_back",
]
SWEEP_ADAPTERS = "fastapi,flask"
# The oldest framework releases the extras allow (FastAPI 0.110.0 requires Starlette 0.36.x).
OLDEST_FRAMEWORKS = ["fastapi==0.110.0", "starlette==0.36.3", "flask==3.0.0", "werkzeug==3.0.0",
                     "django==4.2", "asgiref==3.7.0"]  # fmt: skip


@dataclass
class Leg:
    name: str
    python: str
    mlflow_tracing: str | None  # None: the main venv (full mlflow) as it is
    pins: list[str] = field(default_factory=list)
    modes: tuple[str, ...] = ("code", "env")


LEGS = [
    Leg("oldest", "3.10", "3.4.0", OLDEST_FRAMEWORKS),
    # Before mlflow.tracing.context (3.11), span links (3.15) and async export by default (3.12).
    Leg("middle", "3.12", "3.10.1"),
    Leg("newest", "3.13", "3.17.2"),
    Leg("full", "", None, modes=("env",)),
]
# The newest patch of every other minor in the declared range (pyproject: >=3.4,<3.18).
SWEEP = ["3.5.1", "3.6.0", "3.7.0", "3.8.1", "3.9.0", "3.11.1", "3.12.0", "3.13.0", "3.14.0",
         "3.15.2", "3.16.1"]  # fmt: skip


def say(message: str) -> None:
    print(f"[compat] {message}", flush=True)


def find_python(version: str) -> str:
    """An interpreter of this minor version: PATH first, then pyenv's usual places."""
    if not version:
        return sys.executable
    found = shutil.which(f"python{version}")
    candidates = [found] if found else []
    for root in (os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv"), "/root/.pyenv"):
        if root:
            candidates += sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"), reverse=True)
    for candidate in candidates:
        if subprocess.run([candidate, "-c", "import venv"], capture_output=True).returncode == 0:
            return candidate
    say(f"WARNING: no Python {version} on this machine; this leg runs on {sys.version.split()[0]}")
    return sys.executable


def venv_for(leg: Leg) -> Path:
    """The leg's venv, rebuilt when its requirements change."""
    if leg.mlflow_tracing is None:
        return Path(sys.executable).parent.parent
    python = find_python(leg.python)
    requirements = [f"-e{ROOT}[test-lean]", f"mlflow-tracing=={leg.mlflow_tracing}", *leg.pins]
    stamp_text = "\n".join([python, *requirements, (ROOT / "pyproject.toml").read_text()])
    stamp = hashlib.sha256(stamp_text.encode()).hexdigest()
    venv = VENVS / leg.name
    if (venv / "stamp").exists() and (venv / "stamp").read_text() == stamp:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    started = time.monotonic()
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *requirements], check=True)
    full = subprocess.run([str(venv / "bin/python"), "-c", "import importlib.util as u; "
                           "print(u.find_spec('mlflow.server') is not None)"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert full.stdout.strip() == "False", f"{leg.name}: the full mlflow package got into a lean leg"
    (venv / "stamp").write_text(stamp)
    say(f"{leg.name}: venv ready in {time.monotonic() - started:.0f}s ({python})")
    return venv


def pytest(venv: Path, tests: list[str], env: dict[str, str], label: str) -> tuple[bool, float]:
    started = time.monotonic()
    command = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-W", "ignore::DeprecationWarning", *tests]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    summary = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line]
    say(f"{label}: {summary[-1] if summary else 'no summary'} ({elapsed:.0f}s)")
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", flush=True)
    return proc.returncode == 0, elapsed


def versions(venv: Path) -> str:
    code = ("import importlib.metadata as m, sys; print(sys.version.split()[0], *(f'{p} {m.version(p)}' "
            "for p in ('mlflow-tracing', 'fastapi', 'starlette', 'flask', 'werkzeug', 'django', 'asgiref')), "
            "sep=', ')")  # fmt: skip
    found = subprocess.run([str(venv / "bin/python"), "-c", code], capture_output=True, text=True)
    return found.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--legs", default=",".join(leg.name for leg in LEGS))
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each mostly waits on its server)")
    args = parser.parse_args()
    started = time.monotonic()
    base = {"MLFLOW_CTX_SERVER_PYTHON": sys.executable}
    runs = []
    for leg in [leg for leg in LEGS if leg.name in args.legs.split(",")]:
        venv = venv_for(leg)
        say(f"{leg.name}: Python {versions(venv)}")
        runs += [(venv, {**base, "MLFLOW_CTX_CONFIG": mode}, f"{leg.name}/{mode}") for mode in leg.modes]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(lambda run: pytest(run[0], CORE, run[1], run[2]), runs))
    results = [(label, ok, elapsed) for (_, _, label), (ok, elapsed) in zip(runs, done, strict=True)]
    if not args.no_sweep:
        results += sweep(base)
    say(f"summary ({time.monotonic() - started:.0f}s in all):")
    for label, ok, elapsed in results:
        say(f"  {'ok  ' if ok else 'FAIL'} {label:<22} {elapsed:5.0f}s")
    return 0 if all(ok for _, ok, _ in results) else 1


def sweep(base: dict[str, str]) -> list[tuple[str, bool, float]]:
    """Every other minor swapped into one venv (pip re-resolves its dependencies each time)."""
    leg = Leg("sweep", "3.11", SWEEP[0])
    venv = venv_for(leg)
    results = []
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlflow-ctx-sweep-")))
        url = stack.enter_context(local_mlflow_server(workdir, python=sys.executable))
        env = {**base, "MLFLOW_CTX_TRACKING_URI": url, "MLFLOW_CTX_ADAPTERS": SWEEP_ADAPTERS}
        pip = [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        for i, version in enumerate(SWEEP):
            subprocess.run([*pip, f"mlflow-tracing=={version}"], check=True)
            mode = ("code", "env")[i % 2]
            ok, elapsed = pytest(venv, SWEEP_CORE, {**env, "MLFLOW_CTX_CONFIG": mode}, f"{version}/{mode}")
            results.append((f"sweep {version}/{mode}", ok, elapsed))
    (venv / "stamp").unlink(missing_ok=True)  # it no longer holds the version its stamp names
    return results


if __name__ == "__main__":
    sys.exit(main())
