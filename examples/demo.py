"""The demo: three example apps traced into a local MLflow server, driven like real users.

`make demo` runs this. It starts `mlflow server` on a SQLite store under ./demo, the FastAPI,
Flask and Django examples (two app versions), sends multi-turn chats from several users, then
prints what MLflow captured, read back through MLflow's own client.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
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


def summarise(traces: list, experiment_id: str) -> None:
    """Print the tables a product owner asks for, from MLflow's own records."""
    by_user: dict[str, list] = defaultdict(list)
    by_session: dict[str, list] = defaultdict(list)
    by_version: dict[str, list] = defaultdict(list)
    for trace in traces:
        meta = trace.info.trace_metadata
        by_user[meta.get("mlflow.trace.user", "-")].append(trace)
        by_session[meta.get("mlflow.trace.session", "-")].append(trace)
        by_version[meta.get("app_version", "-")].append(trace)

    print(f"\n{len(traces)} traces in experiment {experiment_id}\n")
    print(f"{'user':<10}{'interactions':>14}{'sessions':>10}{'mean ms':>10}")
    for user, items in sorted(by_user.items()):
        sessions = {t.info.trace_metadata.get("mlflow.trace.session") for t in items}
        mean = statistics.mean(t.info.execution_duration or 0 for t in items)
        print(f"{user:<10}{len(items):>14}{len(sessions):>10}{mean:>10.1f}")
    print("\nsessions, turns in order:")
    for session, items in sorted(by_session.items()):
        items.sort(key=lambda t: t.info.request_time)
        turns = ", ".join(f"{_state(t)} {t.info.execution_duration} ms" for t in items)
        print(f"  {session:<28} {turns}")
    print(f"\n{'app_version':<12}{'traces':>8}{'error rate':>12}{'mean ms':>10}")
    for version, items in sorted(by_version.items()):
        errors = sum(_state(t) == "ERROR" for t in items)
        mean = statistics.mean(t.info.execution_duration or 0 for t in items)
        print(f"{version:<12}{len(items):>8}{errors / len(items):>12.0%}{mean:>10.1f}")
    print("\nas MLflow's trace list shows them (request -> response):")
    for trace in sorted(traces, key=lambda t: t.info.request_time)[:3]:
        print(f"  {trace.info.request_preview or '-'!s:<40.40} -> {trace.info.response_preview or '-'!s:.40}")
    thumbs = [a.value for t in traces for a in t.info.assessments if a.name == "user_feedback"]
    stars = [a.value for t in traces for a in t.info.assessments if a.name == "stars"]
    rated = sum(any(a.name == "user_feedback" for a in t.info.assessments) for t in traces)
    print(
        f"\nfeedback rate: {rated / max(len(traces), 1):.0%} of traces have thumbs up/down; "
        f"positive: {sum(map(bool, thumbs)) / max(len(thumbs), 1):.0%} of {len(thumbs)}; "
        f"mean stars: {statistics.mean(stars) if stars else 0:.2f} ({len(stars)} ratings)"
    )


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
        summarise(wait_for_traces(experiment_id, sent.trace_ids, since_ms, sent.feedback), experiment_id)
        print(f"\nBrowse the traces: {tracking_uri}/#/experiments/{experiment_id}/traces")
        print("  filter e.g.  metadata.`mlflow.trace.user` = 'alice'")
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
