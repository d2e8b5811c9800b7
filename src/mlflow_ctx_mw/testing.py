"""A local MLflow tracking server for tests and demos (needs the full `mlflow` package).

with local_mlflow_server(tmp_path) as url:
    mlflow.set_tracking_uri(url)
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["free_port", "local_mlflow_server", "stopping", "wait_http"]


def free_port(preferred: int = 0) -> int:
    """`preferred` if it is free on 127.0.0.1, else any free port. Free as servers see it: a
    port whose old connections linger in TIME_WAIT is free (they bind with SO_REUSEADDR)."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port on 127.0.0.1")


def wait_http(url: str, *, timeout: float = 120, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until `url` answers below 500; fails early if `proc` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@contextmanager
def stopping(proc: subprocess.Popen[bytes], timeout: float = 15) -> Iterator[subprocess.Popen[bytes]]:
    """Yield `proc`; SIGTERM it on the way out, SIGKILL if it lingers."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def local_mlflow_server(
    workdir: Path, port: int = 0, *, log: Path | None = None, python: str | None = None
) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a SQLite store in `workdir`; yields its URL.

    `python` is an interpreter with the full `mlflow` package (default: this one); the app's own
    environment may then hold only the lean `mlflow-tracing`, as in production. Artifacts are
    served by the server (`mlflow-artifacts:`), so no client needs the server's disk.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(port)
    command = [
        python or sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", str(workdir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with (log or workdir / "mlflow.log").open("ab") as out:
        proc = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    with stopping(proc, timeout=20):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc=proc)
        yield url
