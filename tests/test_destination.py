"""An experiment named only by MLFLOW_EXPERIMENT_NAME / _ID is resolved once, not per request.

MLflow itself looks it up over HTTP as every trace starts (3-70 ms on the request path here;
seconds of retries, then no trace, while the server is down). Each case runs in a fresh process:
the point is what happens when nothing in the process has called `mlflow.set_experiment`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
from mlflow.version import IS_TRACING_SDK_ONLY

from conftest import create_experiment, experiment_named, search
from mlflow_ctx_mw.testing import free_port

# Counts (and passes through) the client calls MLflow makes to find an experiment, and its asks
# of the default-experiment providers (each tries to import Databricks' and IPython's modules).
SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
# Every experiment lookup MLflow's clients make goes through the tracking-service client.
from mlflow.tracking._tracking_service.client import TrackingServiceClient
calls = []
for name in ("get_experiment_by_name", "get_experiment", "create_experiment"):
    def spy(self, *args, _original=getattr(TrackingServiceClient, name), _name=name, **kwargs):
        calls.append(_name)
        return _original(self, *args, **kwargs)
    setattr(TrackingServiceClient, name, spy)
try:
    from mlflow.tracking.default_experiment import registry
except ImportError:  # the lean package without PyYAML has no provider registry
    registry = None
if registry is not None:
    def default_spy(_original=registry.get_experiment_id):
        calls.append("default_experiment")
        return _original()
    registry.get_experiment_id = default_spy

from werkzeug.test import create_environ
from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

import mlflow

def app(environ, start_response):
    with mlflow.start_span("work"):  # MLflow finds the experiment of a nested span on its own
        pass
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

wrapped = MlflowContextMiddleware(app)
at_start = list(calls)
served = []
for i in range(20):
    seen = {}
    def start_response(status, headers, exc_info=None):
        seen.update(status=status, trace_id=dict(headers).get("X-Trace-ID"))
    body = wrapped(create_environ(f"/items/{i}"), start_response)
    assert b"".join(body) == b"ok"
    getattr(body, "close", lambda: None)()
    served.append(seen)
import mlflow
mlflow.flush_trace_async_logging()
print(json.dumps({"at_start": at_start, "per_request": calls[len(at_start):], "served": served,
                  "registry": registry is not None}))
"""


def run_app(env: dict[str, str], script: str = SCRIPT, cwd: Path | None = None) -> dict:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_EXPERIMENT", "MLFLOW_TRACKING"))
    }
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["stderr"] = out.stderr
    return result


def landed(experiment_id: str) -> set[str]:
    """Ids of the experiment's traces that hold both of the request's spans, the nested one too."""
    return {
        trace.info.trace_id
        for trace in search(experiment=experiment_id)
        if len(trace.data.spans) == 2 and any(s.name == "work" and s.parent_id for s in trace.data.spans)
    }


def test_experiment_name_is_resolved_once_and_traces_land_there(mlflow_server: str) -> None:
    name = f"env-named-{uuid.uuid4().hex[:8]}"  # does not exist yet: MLflow creates it, so do we
    result = run_app({"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": name})
    # Looked up in the background from start-up (the first request waits for it), then never again.
    lookups = Counter(result["at_start"] + result["per_request"])
    assert lookups["get_experiment_by_name"] == 1 and set(lookups.values()) == {1}, lookups
    ids = {served["trace_id"] for served in result["served"]}
    assert None not in ids and len(ids) == 20
    experiment = experiment_named(name)
    assert experiment is not None
    assert landed(experiment) == ids


def test_experiment_id_is_checked_once_and_traces_land_there(mlflow_server: str) -> None:
    """An id needs no lookup to trace the first request; MLflow is told it once (set_experiment
    checks it exists), so that it stops checking for every trace and span."""
    experiment_id = create_experiment(f"env-id-{uuid.uuid4().hex[:8]}")
    result = run_app({"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_ID": experiment_id})
    assert result["at_start"] + result["per_request"] == ["get_experiment"]
    ids = {served["trace_id"] for served in result["served"]}
    assert None not in ids and len(ids) == 20
    assert landed(experiment_id) == ids


@pytest.mark.parametrize("name_or_id", ["MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"])
def test_set_experiment_in_the_app_wins_over_the_environment(mlflow_server: str, name_or_id: str) -> None:
    """The app's own choice is MLflow's cheap path: left alone, even if made after the middleware."""
    chosen = f"app-chosen-{uuid.uuid4().hex[:8]}"
    script = SCRIPT.replace(
        "wrapped = MlflowContextMiddleware(app)",
        f"wrapped = MlflowContextMiddleware(app)\nimport mlflow\nmlflow.set_experiment({chosen!r})",
    )
    assert script != SCRIPT
    env = {"MLFLOW_TRACKING_URI": mlflow_server, name_or_id: "0" if name_or_id.endswith("ID") else "other"}
    result = run_app(env, script)
    ids = {served["trace_id"] for served in result["served"]}
    experiment = experiment_named(chosen)
    assert experiment is not None and None not in ids
    assert landed(experiment) == ids


def test_no_experiment_configured_asks_for_the_default_once(mlflow_server: str) -> None:
    """MLflow alone asks its default-experiment providers as every trace starts (~430 us); the
    lean package has none (they need PyYAML) and would trace nothing: "0", as they would say.
    Either way the default is then made the active experiment (checked once: get_experiment)."""
    result = run_app({"MLFLOW_TRACKING_URI": mlflow_server})
    asked = ["default_experiment"] if result["registry"] else []
    assert result["at_start"] + result["per_request"] == [*asked, "get_experiment"]
    ids = {served["trace_id"] for served in result["served"]}
    assert None not in ids and len(ids) == 20
    assert ids <= landed("0")


@pytest.mark.parametrize("spool", [False, True])
def test_server_down_at_start_costs_no_lookup_per_request(spool: bool) -> None:
    """MLflow alone would retry the lookup on every request, then drop the trace anyway. Without
    the spool the requests are served untraced; with it they are traced into the spool (and sent
    once the experiment resolves: test_outage.py)."""
    closed = f"http://127.0.0.1:{free_port()}"
    built = "wrapped = MlflowContextMiddleware(app)"
    script = SCRIPT.replace(built, built[:-1] + f", spool={spool})")
    assert script != SCRIPT
    result = run_app(
        {
            "MLFLOW_TRACKING_URI": closed,
            "MLFLOW_EXPERIMENT_NAME": "unreachable",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        },
        script,
    )
    assert [served["status"] for served in result["served"]] == ["200 OK"] * 20
    assert all((served["trace_id"] is not None) == spool for served in result["served"])
    lookups = Counter(result["at_start"] + result["per_request"])["get_experiment_by_name"]
    assert lookups == 1 if not spool else 1 <= lookups <= 2  # + the spool's probe, if its turn came
    assert result["stderr"].count("tracing is not ready after start-up") == 1


@pytest.mark.skipif(not IS_TRACING_SDK_ONLY, reason="the full package falls back to a local store")
def test_lean_package_without_a_tracking_uri_says_so_once(tmp_path: Path) -> None:
    """MLflow alone fails, warns and retries its set-up on every request (1.4 ms each)."""
    result = run_app({}, cwd=tmp_path)
    assert [served["status"] for served in result["served"]] == ["200 OK"] * 20
    assert all(served["trace_id"] is None for served in result["served"])
    assert result["stderr"].count("no MLflow tracking server configured") == 1
    assert "Failed to start span" not in result["stderr"]


IMPORTS_SCRIPT = (
    SCRIPT.replace(
        "served = []",
        """import builtins
slow = []
real_import = builtins.__import__
def counting_import(name, *args, **kwargs):
    try:
        return real_import(name, *args, **kwargs)
    except ImportError:
        if sys.modules.get(name, "") is not None:  # not known missing: a sys.path scan each time
            slow.append(name)
        raise
builtins.__import__ = counting_import
served = []""",
    )
    .replace(
        "for i in range(20):\n",
        "for i in range(20):\n    if i == 10:\n        slow.clear()  # an import made once, lazily\n",
    )
    .replace('"registry": registry is not None', '"registry": registry is not None, "slow_imports": slow')
)


def test_no_import_is_attempted_again_for_every_request(mlflow_server: str) -> None:
    """MLflow imports modules the lean package does not ship (and IPython) for every trace: a
    failed import is never cached by Python, so each one scanned sys.path again (7 per request
    on the lean package, 1 on the full one)."""
    result = run_app(
        {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "imports"}, IMPORTS_SCRIPT
    )
    assert None not in {served["trace_id"] for served in result["served"]}
    assert Counter(result["slow_imports"]) == Counter()  # over the last 10 of 20 requests
