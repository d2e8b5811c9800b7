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

import mlflow
import pytest

from mlflow_ctx_mw.testing import free_port

# Counts (and passes through) the client calls MLflow makes to find an experiment, and its asks
# of the default-experiment providers (each tries to import Databricks' and IPython's modules).
SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from mlflow.tracking import MlflowClient
calls = []
for name in ("get_experiment_by_name", "get_experiment", "create_experiment"):
    def spy(self, *args, _original=getattr(MlflowClient, name), _name=name, **kwargs):
        calls.append(_name)
        return _original(self, *args, **kwargs)
    setattr(MlflowClient, name, spy)
from mlflow.tracking.default_experiment import registry
def default_spy(_original=registry.get_experiment_id):
    calls.append("default_experiment")
    return _original()
registry.get_experiment_id = default_spy

from werkzeug.test import create_environ
from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

def app(environ, start_response):
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
print(json.dumps({"at_start": at_start, "per_request": calls[len(at_start):], "served": served}))
"""


def run_app(env: dict[str, str], script: str = SCRIPT) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_EXPERIMENT")}
    out = subprocess.run(
        [sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["stderr"] = out.stderr
    return result


def landed(experiment_id: str) -> set[str]:
    traces = mlflow.search_traces(locations=[experiment_id], include_spans=False, return_type="list")
    return {trace.info.trace_id for trace in traces}


def test_experiment_name_is_resolved_once_and_traces_land_there(mlflow_server: str) -> None:
    name = f"env-named-{uuid.uuid4().hex[:8]}"  # does not exist yet: MLflow creates it, so do we
    result = run_app({"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": name})
    assert result["per_request"] == []
    assert "get_experiment_by_name" in result["at_start"]
    ids = {served["trace_id"] for served in result["served"]}
    assert None not in ids and len(ids) == 20
    experiment = mlflow.get_experiment_by_name(name)
    assert experiment is not None
    assert landed(experiment.experiment_id) == ids


def test_experiment_id_needs_no_lookup_at_all(mlflow_server: str) -> None:
    experiment_id = mlflow.create_experiment(f"env-id-{uuid.uuid4().hex[:8]}")
    result = run_app({"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_ID": experiment_id})
    assert result["at_start"] == [] and result["per_request"] == []
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
    env = {"MLFLOW_TRACKING_URI": mlflow_server, name_or_id: "0" if name_or_id.endswith("ID") else "other"}
    result = run_app(env, script)
    ids = {served["trace_id"] for served in result["served"]}
    experiment = mlflow.get_experiment_by_name(chosen)
    assert experiment is not None and None not in ids
    assert landed(experiment.experiment_id) == ids


def test_no_experiment_configured_asks_for_the_default_once(mlflow_server: str) -> None:
    """MLflow alone asks its default-experiment providers as every trace starts (~430 us)."""
    result = run_app({"MLFLOW_TRACKING_URI": mlflow_server})
    assert result["at_start"] == ["default_experiment"]
    assert result["per_request"] == []
    ids = {served["trace_id"] for served in result["served"]}
    assert None not in ids and len(ids) == 20
    assert ids <= landed("0")


def test_server_down_serves_untraced_without_a_lookup_per_request() -> None:
    """MLflow alone would retry the lookup on every request, then drop the trace anyway."""
    closed = f"http://127.0.0.1:{free_port()}"
    result = run_app(
        {
            "MLFLOW_TRACKING_URI": closed,
            "MLFLOW_EXPERIMENT_NAME": "unreachable",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        }
    )
    assert [served["status"] for served in result["served"]] == ["200 OK"] * 20
    assert all(served["trace_id"] is None for served in result["served"])
    assert result["per_request"] == []
    assert result["stderr"].count("serving requests untraced until it is") == 1
