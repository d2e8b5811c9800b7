"""The demo: three example apps traced into a local MLflow server, driven like real users.

`make demo` runs this. It starts `mlflow server` on a SQLite store under ./demo, the FastAPI,
Flask and Django examples (two app versions), sends multi-turn chats from several users, then
prints what MLflow captured, read back through MLflow's own client.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

from mlflow_ctx_mw.testing import free_port, local_mlflow_server, stopping, wait_http

ROOT = Path(__file__).resolve().parent
EXPERIMENT = "mlflow-ctx-mw-demo"
USERS = ("alice", "bob", "carol")


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


@contextmanager
def process(
    args: list[str], *, cwd: Path, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    with stopping(proc):
        yield proc


def start_apps(stack: ExitStack, tracking_uri: str, workdir: Path) -> dict[str, str]:
    """The three examples, each in its own server process; returns name -> base URL."""
    import mlflow

    # Create the experiment first: three apps creating it at once race, and the losers' spans
    # would have no experiment to go to.
    client = mlflow.MlflowClient(tracking_uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT)
    py = sys.executable
    feedback_secret = os.environ.get("MLFLOW_CTX_FEEDBACK_SECRET") or secrets.token_urlsafe(32)
    specs = {
        # name: (cwd, command, app version)
        "fastapi": (ROOT / "fastapi", [py, "-m", "uvicorn", "app:app"], "1.0.0"),
        "flask": (ROOT / "flask", [py, "-m", "waitress", "app:app"], "1.0.0"),
        "django": (ROOT / "django", [py, "-m", "uvicorn", "chatsite.asgi:application"], "1.1.0"),
    }
    urls: dict[str, str] = {}
    procs = {}
    for name, (cwd, command, version) in specs.items():
        port = free_port()
        if "waitress" in command:
            command = [*command[:3], f"--listen=127.0.0.1:{port}", *command[3:]]
        else:
            command = [*command, "--host", "127.0.0.1", "--port", str(port)]
        env = {
            **os.environ,
            # One secret for the three apps' feedback tokens (each app checks only its own).
            "MLFLOW_CTX_FEEDBACK_SECRET": feedback_secret,
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
            "APP_ENVIRONMENT": "demo",
            "APP_VERSION": version,
            "DEPLOYMENT_ID": f"{name}-local",
            "REGION": "local",
            "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]),
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        }
        procs[name] = stack.enter_context(process(command, cwd=cwd, env=env, log=workdir / f"{name}.log"))
        urls[name] = f"http://127.0.0.1:{port}"
    for name, url in urls.items():
        wait_http(f"{url}/health", proc=procs[name])
        say(f"{name} example ready at {url}")
    return urls


@dataclass
class Sent:
    """What the driver did, to compare with what MLflow captured."""

    requests: int = 0
    errors: int = 0
    trace_ids: list[str] = field(default_factory=list)
    sessions: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    feedback: int = 0


def rate(client: httpx.Client, url: str, user: str, answer: httpx.Response, turn: int) -> int:
    """How a user reacts to an answer: thumbs on some turns, 1-5 stars on others (by trace id,
    with the feedback token the answer came with)."""
    trace_id, token = answer.headers["X-Trace-ID"], answer.headers["X-Feedback-Token"]
    bodies = []
    if turn % 2 == 0:  # thumbs: alice likes everything, the others are harder to please
        bodies.append({"trace_id": trace_id, "name": "user_feedback", "value": user == "alice" or turn == 0})
    if turn == 1:
        bodies.append({"trace_id": trace_id, "name": "stars", "value": 5 if user == "alice" else 3})
    for body in bodies:
        headers = {"X-User-ID": user, "X-Feedback-Token": token}
        response = client.post(f"{url}/mlflow/feedback", json=body, headers=headers)
        response.raise_for_status()  # 202: delivered to MLflow in the background
    return len(bodies)


def drive(urls: dict[str, str], turns: int = 3) -> Sent:
    """Users chat in multi-turn sessions on every app and rate the answers by X-Trace-ID;
    one request per app fails, one answer per app streams."""
    sent = Sent()
    with httpx.Client(timeout=30) as client:
        for app, url in urls.items():
            for user in USERS:
                session = f"{app}-{user}-{uuid.uuid4().hex[:6]}"
                for turn in range(turns):
                    message = f"turn {turn + 1} from {user}"
                    if user == "carol" and turn == turns - 1:
                        message = "please fail"  # one failing request per app
                    headers = {"X-User-ID": user, "X-Session-ID": session, "X-Request-ID": uuid.uuid4().hex}
                    # An unhandled error makes uvicorn drop the keep-alive connection: own one.
                    post = httpx.post if message == "please fail" else client.post
                    response = post(f"{url}/chat", json={"message": message}, headers=headers, timeout=30)
                    sent.requests += 1
                    sent.errors += response.status_code >= 500
                    sent.trace_ids.append(response.headers.get("X-Trace-ID", ""))
                    sent.sessions[session].append(headers["X-Request-ID"])
                    if response.status_code == 200:
                        sent.feedback += rate(client, url, user, response, turn)
            headers = {"X-User-ID": "alice", "X-Session-ID": f"{app}-stream-{uuid.uuid4().hex[:6]}"}
            with client.stream(
                "POST", f"{url}/chat/stream", json={"message": "stream me"}, headers=headers
            ) as r:
                words = [line for line in r.iter_lines() if line.startswith("data: ") and line != "data: "]
                sent.requests += 1
                sent.trace_ids.append(r.headers.get("X-Trace-ID", ""))
            say(f"{app}: streamed {len(words)} words, X-Trace-ID arrived with the headers")
    return sent


def wait_for_traces(
    experiment_id: str, trace_ids: list[str], since_ms: int, feedback: int = 0, timeout: float = 60
) -> list:
    """This run's traces, once every request the driver made has its finished trace in MLflow,
    and the `feedback` ratings it sent are on them (they are delivered in the background)."""
    import mlflow

    wanted = set(trace_ids)
    deadline = time.monotonic() + timeout
    while True:
        traces = mlflow.search_traces(
            locations=[experiment_id],
            filter_string=f"trace.timestamp_ms >= {int(since_ms)}",
            return_type="list",
            max_results=5000,
        )
        done = {t.info.trace_id for t in traces if _state(t) in ("OK", "ERROR")}
        rated = sum(len(t.info.assessments) for t in traces)
        if (wanted <= done and rated >= feedback) or time.monotonic() > deadline:
            return [t for t in traces if t.info.trace_id in done]
        time.sleep(0.5)


def _state(trace) -> str:  # type: ignore[no-untyped-def]
    return str(getattr(trace.info.state, "value", trace.info.state))


def summarise(experiment_id: str, since_ms: int, traces: list, html: Path | None = None) -> None:
    """The questions a product owner asks, answered by `mlflow_ctx_mw.analytics` (what
    `mlflow-ctx report` prints), from MLflow's own records of this run."""
    from mlflow_ctx_mw import analytics, cli

    since = datetime.fromtimestamp(since_ms / 1000, tz=timezone.utc)
    rows = analytics.fetch(EXPERIMENT, since=since)
    print(f"\n{len(rows)} traces in experiment {experiment_id}\n")
    for by in ("user", "app_version", "route"):
        print(cli.table(analytics.rollup(rows, by), by) + "\n")
    versions = [g.group for g in analytics.rollup(rows, "app_version") if g.group][:2]
    if len(versions) == 2:
        result = analytics.compare(rows, *sorted(versions))
        print(f"app_version {result.a.group} -> {result.b.group}:")
        for test in result.tests:
            verdict = "more than noise" if test.significant else "within noise"
            p = "-" if test.p_value is None else f"{test.p_value:.3f}"
            print(f"  {test.metric:<15} {test.a!s:>8.6} -> {test.b!s:<8.6} p={p} ({test.method}: {verdict})")
    print("\nunhappiest sessions (most thumbs down), turns in order:")
    for group in analytics.worst(rows, "session", limit=3):
        turns = analytics.session_turns(rows, group.group or "")
        shown = ", ".join(_turn(turn) for turn in turns)
        print(f"  {group.group:<28} {shown}")
    print("\nfeedback:")
    for summary in analytics.summarise(None, rows).feedback:
        share = "-" if summary.positive_share is None else f"{summary.positive_share:.0%}"
        mean = "-" if summary.mean_score is None else f"{summary.mean_score:.2f}"
        print(f"  {summary.name:<14} {summary.count} ratings, positive {share}, mean {mean}")
    print("\nas MLflow's trace list shows them (request -> response):")
    for trace in sorted(traces, key=lambda t: t.info.request_time)[:3]:
        print(f"  {trace.info.request_preview or '-'!s:<40.40} -> {trace.info.response_preview or '-'!s:.40}")
    if html is not None:
        import mlflow

        from mlflow_ctx_mw.analytics.html import render

        uri = mlflow.get_tracking_uri()
        html.write_text(render(rows, by="user", experiment=EXPERIMENT, experiment_id=experiment_id,
                               tracking_uri=uri, window="this run"), encoding="utf-8")  # fmt: skip
        say(f"HTML report (charts, unhappiest sessions linked into MLflow): {html}")


def _turn(turn) -> str:  # type: ignore[no-untyped-def]
    rated = " ".join(f"{f.name}={f.value}" for f in turn.feedback)
    return f"{'ok' if turn.ok else 'ERROR'} {turn.duration_ms:.0f} ms {rated}".strip()


def main() -> int:
    import mlflow

    workdir = Path.cwd() / "demo"
    workdir.mkdir(exist_ok=True)
    with ExitStack() as stack:
        say(f"starting MLflow server on 127.0.0.1 (SQLite store: {workdir / 'mlflow.db'})")
        tracking_uri = stack.enter_context(local_mlflow_server(workdir, 5000))
        say(f"MLflow server ready at {tracking_uri}")
        mlflow.set_tracking_uri(tracking_uri)
        experiment_id = mlflow.set_experiment(EXPERIMENT).experiment_id
        since_ms = int(time.time() * 1000)
        urls = start_apps(stack, tracking_uri, workdir)
        say("driving the apps like real users...")
        sent = drive(urls)
        say(
            f"sent {sent.requests} requests ({sent.errors} failed on purpose) and {sent.feedback} "
            "feedback calls; waiting for the exporter"
        )
        traces = wait_for_traces(experiment_id, sent.trace_ids, since_ms, sent.feedback)
        summarise(experiment_id, since_ms, traces, workdir / "report.html")
        print(f"\nBrowse the traces: {tracking_uri}/#/experiments/{experiment_id}/traces")
        print("  filter e.g.  metadata.`mlflow.trace.user` = 'alice'")
        print(f"The same tables any time: mlflow-ctx report --experiment {EXPERIMENT} --by user "
              f"(MLFLOW_TRACKING_URI={tracking_uri})")  # fmt: skip
        if sys.stdin.isatty() and os.environ.get("DEMO_NO_WAIT") != "1":
            say("the MLflow UI stays up until you press Ctrl-C")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                print()
        say("stopping the apps and the MLflow server")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
