"""A person's path: the FastAPI example's chat page in headless Chromium, served by uvicorn,
thumbs up/down through the feedback endpoint, checked on the trace through MLflow's client."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from conftest import get_trace
from mlflow_ctx_mw.testing import free_port, stopping, wait_http
from test_feedback import assessments

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def example_app(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The FastAPI example under uvicorn, in its own process; (URL, experiment id)."""
    experiment = f"browser-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": experiment}
    log = (tmp_path_factory.mktemp("browser") / "app.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=EXAMPLES / "fastapi",
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    with stopping(proc):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc=proc, timeout=60)
        yield url, mlflow.get_experiment_by_name(experiment).experiment_id
    log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.mark.parametrize(("streamed", "thumb", "comment"), [(False, "up", ""), (True, "down", "too terse")])
def test_thumbs_from_the_chat_page_land_on_the_trace(
    example_app: tuple[str, str], browser: object, streamed: bool, thumb: str, comment: str
) -> None:
    url, _ = example_app
    user = f"browser-{uuid.uuid4().hex[:8]}"
    page = browser.new_page()  # type: ignore[attr-defined]
    try:
        page.goto(url)
        page.fill("#user", user)
        if streamed:
            page.check("#stream")
        page.fill("#message", "hello from chromium")
        page.click("#send")
        answer = page.locator(".bot.answered").last
        answer.wait_for(timeout=15_000)
        assert "You said: hello from chromium" in answer.inner_text()
        trace_id = answer.get_attribute("data-trace-id")
        assert trace_id and trace_id.startswith("tr-")
        if comment:
            answer.locator(".comment").fill(comment)
        answer.locator(f"button.{thumb}").click()
        answer.locator(".status", has_text="thanks!").wait_for(timeout=20_000)
    finally:
        page.close()

    trace = get_trace(trace_id)  # once whole: MLflow stores spans and trace info apart
    assert trace.info.trace_metadata["mlflow.trace.user"] == user
    assert trace.info.trace_metadata.get("mlflow.trace.session")  # the page's session id
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.name == ("POST /chat/stream" if streamed else "POST /chat")
    [feedback] = assessments(trace_id, 1)
    assert feedback.name == "user_feedback"
    assert feedback.value is (thumb == "up")
    assert (feedback.source.source_type, feedback.source.source_id) == ("HUMAN", user)
    assert (feedback.rationale or "") == comment
