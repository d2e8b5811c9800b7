"""Installable as users install it (`make package`): the built wheel and sdist, each in a clean
venv with nothing but what it declares, trace a request into a real tracking server.

    python tests/package_smoke.py dist/
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from mlflow_ctx_mw.testing import local_mlflow_server  # noqa: E402

# Runs in the clean venv: the lean install, configured as a container would be (environment only).
SMOKE = """
import importlib.metadata, json, pathlib, sys
import mlflow_ctx_mw
from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]

wrapped = MlflowContextMiddleware(app)
environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/smoke", "wsgi.input": None,
           "HTTP_X_USER_ID": "smoke-user", "HTTP_X_REQUEST_ID": "smoke-req"}
seen = {}
body = wrapped(environ, lambda status, headers, exc_info=None: seen.update(dict(headers)))
assert b"".join(body) == b"hello"
getattr(body, "close", lambda: None)()
import mlflow
mlflow.flush_trace_async_logging()
print(json.dumps({
    "version": mlflow_ctx_mw.__version__,
    "metadata_version": importlib.metadata.version("mlflow-ctx-mw"),
    "typed": (pathlib.Path(mlflow_ctx_mw.__file__).parent / "py.typed").exists(),
    "full_mlflow": importlib.util.find_spec("mlflow.server") is not None,
    "trace_id": seen.get("X-Trace-ID"),
    "request_id": seen.get("X-Request-ID"),
}))
"""


def smoke(artifact: Path, tracking_uri: str, workdir: Path) -> dict[str, object]:
    env_dir = workdir / artifact.name.replace(".", "_")
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(artifact)],
                   check=True)  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_NAME": "package-smoke", "PATH": "/bin",
           "MLFLOW_CTX_FEEDBACK_SECRET": "package-smoke-secret"}  # fmt: skip
    out = subprocess.run([python, "-c", SMOKE], env=env, capture_output=True, text=True, cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    # The console script, on the lean install: what it reads back of the smoke request.
    report = [str(env_dir / "bin" / "mlflow-ctx"), "report", "--experiment", "package-smoke", "--since", "1h",
              "--by", "user", "--format", "json"]  # fmt: skip
    out = subprocess.run(report, env=env, capture_output=True, text=True, cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    result["report"] = {row["group"]: row["traces"] for row in json.loads(out.stdout)}
    return result


def main() -> int:
    dist = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "dist")
    artifacts = sorted([*dist.glob("*.whl"), *dist.glob("*.tar.gz")])
    assert len(artifacts) == 2, f"expected one wheel and one sdist in {dist}, found {artifacts}"
    with (
        tempfile.TemporaryDirectory(prefix="mlflow-ctx-package-") as tmp,
        local_mlflow_server(Path(tmp) / "server") as url,
    ):
        import mlflow

        mlflow.set_tracking_uri(url)
        for artifact in artifacts:
            result = smoke(artifact, url, Path(tmp))
            trace = mlflow.get_trace(str(result["trace_id"])) if result["trace_id"] else None
            checks = {
                "version matches the metadata": result["version"] == result["metadata_version"],
                "py.typed installed": result["typed"],
                "lean: no full mlflow pulled in": not result["full_mlflow"],
                "request id echoed": result["request_id"] == "smoke-req",
                "trace in MLflow with its user": trace is not None
                and trace.info.trace_metadata.get("mlflow.trace.user") == "smoke-user",
                "mlflow-ctx report counts it": dict(result["report"]).get("smoke-user", 0) >= 1,
            }
            failed = [name for name, ok in checks.items() if not ok]
            print(f"[package] {artifact.name}: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)} "
                  f"(version {result['version']})", flush=True)  # fmt: skip
            if failed:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
