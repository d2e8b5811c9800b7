"""The servers the README names, each running a tests/served.py app in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow_ctx_mw.testing import free_port, stopping, wait_http

TESTS = Path(__file__).resolve().parent
PY = sys.executable

UVICORN = [PY, "-m", "uvicorn", "--factory"]
GUNICORN = [PY, "-m", "gunicorn", "-w", "1"]
# name -> the server's command line for a port (apps: tests/served.py's factories)
SERVERS: dict[str, Callable[[int], list[str]]] = {
    "uvicorn, lifespan": lambda p: [*UVICORN, "served:fastapi", "--port", str(p)],
    "uvicorn, lifespan off": lambda p: [*UVICORN, "served:fastapi", "--port", str(p), "--lifespan", "off"],
    "uvicorn, Django ASGI": lambda p: [*UVICORN, "served:django_asgi", "--port", str(p)],
    "gunicorn sync": lambda p: [*GUNICORN, "-b", f"127.0.0.1:{p}", "served:flask()"],
    "gunicorn threaded": lambda p: [*GUNICORN, "--threads", "8", "-b", f"127.0.0.1:{p}", "served:flask()"],
    "gunicorn, uvicorn workers": lambda p: [*GUNICORN, "-k", "uvicorn.workers.UvicornWorker", "-b",
                                            f"127.0.0.1:{p}", "served:fastapi()"],
    "waitress, Flask": lambda p: [PY, "-m", "waitress", f"--listen=127.0.0.1:{p}", "--call", "served:flask"],
    "waitress, Django WSGI": lambda p: [PY, "-m", "waitress", f"--listen=127.0.0.1:{p}", "--call",
                                        "served:django_wsgi"],
    "hypercorn, Django ASGI": lambda p: [PY, "-m", "hypercorn", "-b", f"127.0.0.1:{p}",
                                         "served:django_asgi()"],
    "granian, Django ASGI": lambda p: [PY, "-m", "granian", "--interface", "asgi", "--factory", "--port",
                                       str(p), "served:django_asgi"],
}  # fmt: skip


def app_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "DJANGO_SETTINGS_MODULE": "djproj.settings", **extra}


@contextmanager
def served_app(
    server: str, env: dict[str, str], log: Path, port: int = 0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The app under `server` on `port` (any free one by default); stopped on the way out."""
    port = port or free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            SERVERS[server](port), cwd=TESTS, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    with stopping(proc):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/items/0", proc=proc, timeout=60)
        yield url, proc


def terminate(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """SIGTERM and wait for the exit; a server still up by then dumps its threads' stacks."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # hung: what every thread is doing (served.py)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        stacks = log.read_text(errors="replace")[-12000:]
        raise AssertionError(f"no exit {timeout:g} s after SIGTERM; server log:\n{stacks}") from None
