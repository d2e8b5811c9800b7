"""A request's latency while the tracking server is down, failing, slow or hanging, against the
same app untraced (the fail-open check in tests/test_production.py asserts no request waits on
MLflow; this measures what is left).

    python bench/outage.py [--modes down,5xx,slow,hang] [--kinds fastapi,flask] [--requests 200]

Each (mode, kind) starts the test app (tests/served.py) twice, traced and bare (uvicorn for
FastAPI, gunicorn with 8 threads for Flask), against a fake tracking server, and sends the same
GET to both, interleaved so that both see the same machine noise. Writes bench/results/outage-*.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
from test_production import BROKEN_MODES, app_process, broken_env, broken_tracking_server  # noqa: E402


def timed_get(client: httpx.Client, url: str) -> float:
    start = time.perf_counter()
    response = client.get(url, headers={"X-User-ID": "outage", "X-Session-ID": "s"})
    assert response.status_code == 200, response.status_code
    return time.perf_counter() - start


def measure(mode: str, kind: str, requests: int) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        broken_tracking_server(mode) as tracking,
        app_process(kind, Path(tmp), broken_env(tracking), name="traced") as (traced, _, _),
        app_process(kind, Path(tmp), broken_env(tracking), bare=True, name="bare") as (bare, _, _),
        httpx.Client(timeout=60) as client,
    ):
        for _ in range(10):  # warm-up
            timed_get(client, traced + "/items/5")
            timed_get(client, bare + "/items/5")
        on, off = [], []
        for _ in range(requests):
            on.append(timed_get(client, traced + "/items/5"))
            off.append(timed_get(client, bare + "/items/5"))

    def ms(values: list[float], q: int) -> float:
        return round(statistics.quantiles(values, n=100)[q - 1] * 1000, 2)

    return {"traced_p50_ms": ms(on, 50), "bare_p50_ms": ms(off, 50), "traced_p95_ms": ms(on, 95),
            "bare_p95_ms": ms(off, 95), "traced_max_ms": round(max(on) * 1000, 2)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(BROKEN_MODES))
    parser.add_argument("--kinds", default="fastapi,flask")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    rows = []
    print(f"{'mode':6} {'app':8} {'traced p50':>11} {'bare p50':>9} {'traced p95':>11} {'bare p95':>9} "
          f"{'traced max':>11}  (ms)", flush=True)  # fmt: skip
    for mode in args.modes.split(","):
        for kind in args.kinds.split(","):
            row = {"mode": mode, "kind": kind, **measure(mode, kind, args.requests)}
            rows.append(row)
            print(f"{mode:6} {kind:8} {row['traced_p50_ms']:11} {row['bare_p50_ms']:9} "
                  f"{row['traced_p95_ms']:11} {row['bare_p95_ms']:9} {row['traced_max_ms']:11}",
                  flush=True)  # fmt: skip
    out = ROOT / "bench" / "results" / f"outage-{int(time.time())}.json"
    out.write_text(json.dumps({"requests": args.requests, "rows": rows}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
