"""Nothing left behind: requests through each adapter in-process keep memory and MLflow's
buffers bounded. The suite drives 15,000 requests per adapter; the full-size run is
`python tests/memory_probe.py asgi 100000` (figures in the closing note of issue 4)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlflow_ctx_mw.span import RequestSpan
from mlflow_ctx_mw.testing import free_port

pytestmark = pytest.mark.scenario

PROBE = Path(__file__).resolve().parent / "memory_probe.py"
REQUESTS = int(os.environ.get("MLFLOW_CTX_MEMORY_REQUESTS", "15000"))


def probe(adapter: str, *, bare: bool, requests: int = REQUESTS) -> dict[str, Any]:
    env = {
        **os.environ,
        # A closed port: the exporter fails fast, so what stays in memory is ours and MLflow's.
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_CTX_BARE": "1" if bare else "0",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    out = subprocess.run(
        [sys.executable, str(PROBE), adapter, str(requests)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["requests"] == requests
    return result


def excess(adapter: str, requests: int) -> tuple[float, float, dict[str, Any], dict[str, Any]]:
    """RSS growth over the same app untraced: in the run's second half, and after the warm-up."""
    ours, bare = probe(adapter, bare=False, requests=requests), probe(adapter, bare=True, requests=requests)
    assert ours["open_traces_in_mlflow_buffer"] <= 1000  # MLFLOW_TRACE_BUFFER_MAX_SIZE, not growing
    late = (ours["rss_end_mb"] - ours["rss_half_mb"]) - (bare["rss_end_mb"] - bare["rss_half_mb"])
    growth = (ours["rss_end_mb"] - ours["rss_after_warmup_mb"]) - (
        bare["rss_end_mb"] - bare["rss_after_warmup_mb"]
    )
    return late, growth, ours, bare


@pytest.mark.parametrize("adapter", ["asgi", "wsgi", "django"])
def test_memory_and_mlflow_buffers_stay_bounded(adapter: str) -> None:
    # Bounded buffers (MLflow's 1,000 traces and 1,000 export tasks, the spool's 200-trace
    # hand-off) may still be filling after the warm-up; how fast depends on the machine's load
    # (17.9 MB seen with other work on 2 cores; once +12 MB in the second half, in CI, where 4 of 4
    # runs here under two CPU hogs gave +1.6 to +3.0 MB with the spool on or off). A leak grows
    # with the requests: a first run over the bounds is run again twice as long, where a leak of
    # 2 KB a request (the bug this catches: +11.7 MB over 6,000) shows twice as large.
    late, growth, ours, bare = excess(adapter, REQUESTS)
    if late >= 8 or growth >= 25:
        late, growth, ours, bare = excess(adapter, 2 * REQUESTS)
    assert late < 8, (ours, bare)
    assert growth < 25, (ours, bare)


def test_the_server_keeps_nothing_of_a_request_once_answered(served: tuple[str, str]) -> None:
    """uvicorn snapshots the context in the last send for its keep-alive timer (~5 s): a request's
    span and scope must not be in it, or at load they crowd the GC into long full collections."""
    _, url = served
    run = f"kept-{uuid.uuid4().hex[:8]}"
    with httpx.Client(timeout=10) as client:  # one kept-alive connection, re-armed per response
        for i in range(20):
            response = client.get(f"{url}/items/{i}", headers={"X-Request-ID": f"{run}-{i}"})
            assert response.headers["X-Request-ID"] == f"{run}-{i}"
        deadline = time.monotonic() + 2  # the last request may still be ending its span
        while (alive := _alive_request_spans(run)) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert alive == []


def _alive_request_spans(run: str) -> list[str]:
    gc.collect()
    return [o.context.request_id for o in gc.get_objects()
            if type(o) is RequestSpan and o.context.request_id.startswith(run)]  # fmt: skip
