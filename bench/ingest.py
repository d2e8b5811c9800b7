"""How many traces per second a local MLflow server ingests, and what a given load loses.

    python bench/ingest.py --store sqlite --workers 1 --rate 0 --traces 1500   # burst: capacity
    python bench/ingest.py --store postgres --workers 4 --rate 150 --seconds 20  # sustained load

Traces are made the way the middleware makes them (a root span with the standard fields and one
child span), exported by MLflow's own async exporter. `--rate 0` is a burst with a queue large
enough to hold it: the time until every trace has landed gives the ingest capacity. A rate > 0
runs with MLflow's default queue and reports lost traces and drain time. PostgreSQL (Debian's
package, started here on 127.0.0.1 in a temp dir) needs `apt-get install postgresql` and
`pip install "psycopg[binary]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow_ctx_mw.testing import free_port, stopping, wait_http

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1, run as the `postgres` user."""
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    data = workdir / "pg"
    data.mkdir()
    shutil.chown(workdir, "postgres")
    shutil.chown(data, "postgres")
    port = free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(
        [*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "start",
         "-o", f"-h 127.0.0.1 -p {port} -k {data} -c fsync=on"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        subprocess.run(
            [*as_pg, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "mlflow"], check=True
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            [*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True
        )


@contextmanager
def server(store: str, workers: int, workdir: Path) -> Iterator[str]:
    with postgres(workdir) if store == "postgres" else nullstore(workdir) as uri:
        port = free_port()
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                   "--default-artifact-root", str(workdir / "artifacts"), "--host", "127.0.0.1",
                   "--port", str(port), "--workers", str(workers)]  # fmt: skip
        with (workdir / "server.log").open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        with stopping(proc, timeout=20):
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", proc=proc, timeout=180)
            yield url


@contextmanager
def nullstore(workdir: Path) -> Iterator[str]:
    yield f"sqlite:///{workdir / 'mlflow.db'}"


def make_trace(tag: str, i: int) -> None:
    import mlflow

    from mlflow_ctx_mw import _mlflow

    root = _mlflow.start_root_span(
        "POST /chat",
        metadata={"mlflow.trace.user": f"u{i % 50}", "mlflow.trace.session": f"s{i % 200}", "bench": tag},
        tags={},
        client_request_id=f"{tag}-{i}",
    )
    assert root is not None
    token = _mlflow.attach(root.span)
    with mlflow.start_span("llm"):
        pass
    _mlflow.detach(token)
    http = {_mlflow.METHOD: "POST", _mlflow.PATH: "/chat"}
    _mlflow.end_span(root, name="POST /chat", attributes=http, status_code=200, error=None)


def count(tag: str, experiment_id: str) -> int:
    import mlflow

    total, token = 0, None
    while True:
        page = mlflow.MlflowClient().search_traces(
            locations=[experiment_id], filter_string=f"metadata.bench = '{tag}'",
            max_results=500, page_token=token, include_spans=False,
        )  # fmt: skip
        total += sum(1 for t in page if str(getattr(t.info.state, "value", t.info.state)) == "OK")
        token = page.token
        if not token:
            return total


def run(args: argparse.Namespace) -> dict[str, object]:
    if args.rate == 0:
        os.environ["MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE"] = str(max(4 * args.traces, 1000))
    import mlflow

    from mlflow_ctx_mw.export import export_stats, watch_exports

    workdir = Path(tempfile.mkdtemp(prefix="ingest-"))
    try:
        with server(args.store, args.workers, workdir) as url:
            mlflow.set_tracking_uri(url)
            experiment_id = mlflow.set_experiment("ingest").experiment_id
            watch_exports()
            tag = uuid.uuid4().hex[:8]
            total = args.traces if args.rate == 0 else int(args.rate * args.seconds)
            start = time.monotonic()
            for i in range(total):
                if args.rate:
                    time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                make_trace(tag, i)
            produced = time.monotonic() - start
            mlflow.flush_trace_async_logging()
            drained = time.monotonic() - start
            landed = count(tag, experiment_id)
            stats = export_stats()
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "store": args.store, "workers": args.workers, "mode": "burst" if args.rate == 0 else "sustained",
        "offered_rate": args.rate or round(total / produced, 1), "traces": total, "landed": landed,
        "lost": total - landed, "dropped_exports": stats.dropped_exports,
        "dropped_spans": stats.dropped_spans, "failed_exports": stats.failed_exports,
        "seconds_to_produce": round(produced, 2), "seconds_until_all_written": round(drained, 2),
        "ingest_traces_per_s": round(landed / drained, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0, help="traces/s; 0 = one burst")
    parser.add_argument("--traces", type=int, default=1500, help="burst size")
    parser.add_argument("--seconds", type=float, default=20, help="sustained duration")
    result = run(parser.parse_args())
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    name = f"ingest-{result['store']}-w{result['workers']}-{result['mode']}-{int(time.time())}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
