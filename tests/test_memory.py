"""Nothing left behind: requests through each adapter in-process keep memory and MLflow's
buffers bounded. The suite drives 15,000 requests per adapter; the full-size run is
`python tests/memory_probe.py asgi 100000` (figures in the closing note of issue 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlflow_ctx_mw.testing import free_port

PROBE = Path(__file__).resolve().parent / "memory_probe.py"
REQUESTS = int(os.environ.get("MLFLOW_CTX_MEMORY_REQUESTS", "15000"))


def probe(adapter: str, *, bare: bool) -> dict[str, Any]:
    env = {
        **os.environ,
        # A closed port: the exporter fails fast, so what stays in memory is ours and MLflow's.
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_CTX_BARE": "1" if bare else "0",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    out = subprocess.run(
        [sys.executable, str(PROBE), adapter, str(REQUESTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["requests"] == REQUESTS
    return result


@pytest.mark.parametrize("adapter", ["asgi", "wsgi", "django"])
def test_memory_and_mlflow_buffers_stay_bounded(adapter: str) -> None:
    ours, bare = probe(adapter, bare=False), probe(adapter, bare=True)
    assert ours["open_traces_in_mlflow_buffer"] <= 1000  # MLFLOW_TRACE_BUFFER_MAX_SIZE, not growing
    assert ours["recent_registry"] <= 10_000
    growth = ours["rss_end_mb"] - ours["rss_after_warmup_mb"]
    baseline = bare["rss_end_mb"] - bare["rss_after_warmup_mb"]  # the same app, untraced
    assert growth < baseline + 15, (ours, bare)
