"""The three example apps as the demo runs them (own server processes), driven by the demo's own
driver; the summary it prints is checked against MLflow's search results."""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import mlflow
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import demo


@pytest.fixture(scope="module")
def example_urls(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with ExitStack() as stack:
        yield demo.start_apps(stack, mlflow_server, tmp_path_factory.mktemp("examples"))


@pytest.mark.parametrize("app", ["fastapi", "flask", "django"])
def test_example_smoke(example_urls: dict[str, str], app: str) -> None:
    url = example_urls[app]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "X-Trace-ID" in page.text  # the chat page
    answer = httpx.post(url + "/chat", json={"message": "hello"}, headers={"X-User-ID": "smoke"})
    assert answer.json() == {"answer": "You said: hello"}
    trace_id = answer.headers["X-Trace-ID"]
    headers = {"X-User-ID": "smoke", "X-Feedback-Token": answer.headers["X-Feedback-Token"]}
    rated = httpx.post(url + "/mlflow/feedback", json={"trace_id": trace_id, "value": True}, headers=headers)
    assert rated.status_code == 202, rated.text
    with httpx.stream("POST", url + "/chat/stream", json={"message": "a b c"}) as stream:
        assert stream.headers["X-Trace-ID"].startswith("tr-")
        text = "".join(stream.iter_text())
    assert "data: said:" in text and "event: done" in text


def test_demo_summary_matches_mlflow(
    example_urls: dict[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    experiment_id = mlflow.get_experiment_by_name(demo.EXPERIMENT).experiment_id
    since_ms = int(time.time() * 1000)
    sent = demo.drive(example_urls, turns=2)
    traces = demo.wait_for_traces(experiment_id, sent.trace_ids, since_ms, sent.feedback)
    assert {t.info.trace_id for t in traces} >= set(sent.trace_ids)
    capsys.readouterr()
    demo.summarise(experiment_id, since_ms, traces, tmp_path / "report.html")
    printed = capsys.readouterr().out
    assert (tmp_path / "report.html").stat().st_size > 100_000  # plotly.js inlined

    # What MLflow itself says about this run, by its own search.
    ours = mlflow.search_traces(
        locations=[experiment_id], filter_string=f"trace.timestamp_ms >= {since_ms}", return_type="list"
    )
    assert f"{len(ours)} traces in experiment {experiment_id}" in printed
    per_user = Counter(t.info.trace_metadata.get("mlflow.trace.user") for t in ours)
    for user in demo.USERS:
        row = re.search(rf"^{user}\s+(\d+)\s+(\d+)", printed, re.MULTILINE)
        assert row is not None, printed
        assert int(row.group(1)) == per_user[user]
        sessions = {
            t.info.trace_metadata["mlflow.trace.session"]
            for t in ours
            if t.info.trace_metadata.get("mlflow.trace.user") == user
        }
        assert int(row.group(2)) == len(sessions)
    errors = sum(str(getattr(t.info.state, "value", t.info.state)) == "ERROR" for t in ours)
    assert errors == sent.errors == len(example_urls)  # one failing request per app
    thumbs = [a for t in ours for a in t.info.assessments if a.name == "user_feedback"]
    share = sum(bool(a.value) for a in thumbs) / len(thumbs)
    assert re.search(rf"user_feedback\s+{len(thumbs)} ratings, positive {share:.0%}", printed), printed
    stars = [a.value for t in ours for a in t.info.assessments if a.name == "stars"]
    mean = sum(stars) / len(stars)
    assert re.search(rf"stars\s+{len(stars)} ratings, .* mean {mean:.2f}", printed), printed
