"""The analytics against the session's real tracking server: traffic made through the ASGI
middleware (tests/traffic.py), read back by `mlflow_ctx_mw.analytics` and `mlflow-ctx report`,
every figure checked against what this test sent (or, for latency, what MLflow's own search
returns). The HTML report is opened in Chromium."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pty
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest

import traffic
from conftest import experiment_named, search
from mlflow_ctx_mw import analytics, cli
from mlflow_ctx_mw.analytics.fetch import TraceRow, window_filter
from mlflow_ctx_mw.analytics.rollups import mann_whitney, two_proportions

TAG = f"an{uuid.uuid4().hex[:6]}"
EXPERIMENT = f"analytics-{TAG}"  # the traffic's own: every trace in it is one this test sent
CLI = [sys.executable, "-m", "mlflow_ctx_mw.cli", "report", "--experiment", EXPERIMENT, "--since", "1d"]
FIELD = {"user": "user", "session": "session", "app_version": "version", "deployment": "deployment",
         "region": "region", "route": "route"}  # fmt: skip


@pytest.fixture(scope="module")
def sent(mlflow_server: str) -> list[traffic.Sent]:
    """120 requests through the middleware in a process of their own (its experiment named in its
    environment); every trace and rating stored before a test reads."""
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}
    out = subprocess.run([sys.executable, traffic.__file__, "120", "5", TAG, "3"], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    made = [traffic.Sent(**json.loads(line)) for line in out.stdout.splitlines()]
    rated = sum(1 for s in made if s.rating is not None)
    deadline = time.monotonic() + 120
    while True:
        rows = analytics.fetch(EXPERIMENT)
        if len(rows) == len(made) and sum(len(r.feedback) for r in rows) == rated:
            return made
        assert time.monotonic() < deadline, f"{len(rows)}/{len(made)} traces stored"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def rows(sent: list[traffic.Sent]) -> list[TraceRow]:
    return analytics.fetch(EXPERIMENT, since=analytics.parse_since("1d"))


def durations_from_mlflow() -> dict[str, float]:
    """Each trace's duration as MLflow's own search returns it."""
    found = search(None, experiment_named(EXPERIMENT), include_spans=False, max_results=1000)
    return {trace.info.trace_id: float(trace.info.execution_duration) for trace in found}


@pytest.mark.parametrize("by", list(analytics.DIMENSIONS))
def test_each_rollup_matches_what_was_sent(sent: list[traffic.Sent], rows: list[TraceRow], by: str) -> None:
    mine: dict[str, list[traffic.Sent]] = defaultdict(list)
    for s in sent:
        mine[("POST " + s.route) if by == "route" else getattr(s, FIELD[by])].append(s)
    durations = durations_from_mlflow()
    groups = analytics.rollup(rows, by)
    assert {g.group for g in groups} == set(mine)  # every trace carries the field: no group None
    assert [g.traces for g in groups] == sorted((g.traces for g in groups), reverse=True)
    for group in groups:
        expected = mine[group.group]  # type: ignore[index]
        ratings = [s.rating for s in expected if s.rating is not None]
        assert group.traces == len(expected)
        assert group.errors == sum(s.status >= 500 for s in expected)
        assert group.error_rate == pytest.approx(group.errors / len(expected))
        assert group.feedback_count == len(ratings) and group.positive == sum(ratings)
        assert group.positive_share == (pytest.approx(sum(ratings) / len(ratings)) if ratings else None)
        assert group.total_tokens == sum(s.tokens for s in expected)
        assert group.cost == pytest.approx(sum(s.tokens for s in expected) * 3e-6)
        latencies = [durations[s.trace_id] for s in expected]
        if len(latencies) == 1:
            assert group.p50_ms == group.p95_ms == group.p99_ms == latencies[0]
            continue
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")  # linear, between ranks
        assert (group.p50_ms, group.p95_ms, group.p99_ms) == pytest.approx((cuts[49], cuts[94], cuts[98]))


def test_the_servers_own_metrics_say_the_same_per_route(rows: list[TraceRow]) -> None:
    """MLflow's metrics API (the server aggregates) against our rollup of the searched traces."""
    if not hasattr(analytics.client().store, "query_trace_metrics"):
        pytest.skip("the metrics API came with MLflow 3.10")
    ours = {g.group: g for g in analytics.rollup(rows, "route")}
    theirs = analytics.route_rollup(EXPERIMENT, since=analytics.parse_since("1d"))
    assert {g.group for g in theirs} == set(ours) and len(ours) == 3
    for group in theirs:
        mine = ours[group.group]
        assert (group.traces, group.errors, group.total_tokens) == (
            mine.traces,
            mine.errors,
            mine.total_tokens,
        )
        assert (group.p50_ms, group.p95_ms, group.p99_ms) == pytest.approx(
            (mine.p50_ms, mine.p95_ms, mine.p99_ms)
        )


def test_a_filter_narrows_what_is_read(sent: list[traffic.Sent]) -> None:
    out = run_cli("--by", "user", "--format", "json", "--filter", "metadata.app_version = '1.3.0'")
    assert out.returncode == 0, out.stderr
    by_user = Counter(s.user for s in sent if s.version == "1.3.0")
    assert {item["group"]: item["traces"] for item in json.loads(out.stdout)} == dict(by_user)


def test_a_sessions_turns_come_in_order_with_their_feedback(
    sent: list[traffic.Sent], rows: list[TraceRow]
) -> None:
    by_session = Counter(s.session for s in sent)
    session = by_session.most_common(1)[0][0]
    turns = analytics.session_turns(rows, session)
    expected = {s.trace_id: s for s in sent if s.session == session}
    assert len(turns) == by_session[session] >= 2 and {t.trace_id for t in turns} == set(expected)
    assert [t.time_ms for t in turns] == sorted(t.time_ms for t in turns)
    for turn in turns:
        rating = expected[turn.trace_id].rating
        assert [f.value for f in turn.feedback] == ([] if rating is None else [rating])
        assert turn.request_id == expected[turn.trace_id].request_id


def test_the_unhappiest_sessions_and_users_come_first(sent: list[traffic.Sent], rows: list[TraceRow]) -> None:
    for by, field in (("session", "session"), ("user", "user")):
        negative = Counter(getattr(s, field) for s in sent if s.rating is False)
        ranked = analytics.worst(rows, by, limit=3)
        assert ranked, "the traffic has negative ratings"
        assert [g.negative for g in ranked] == sorted(negative.values(), reverse=True)[: len(ranked)]
        assert all(g.negative == negative[g.group] for g in ranked)


def test_two_versions_compared_with_their_differences(sent: list[traffic.Sent], rows: list[TraceRow]) -> None:
    result = analytics.compare(rows, "1.3.0", "1.4.0")
    errors = {v: [s.status >= 500 for s in sent if s.version == v] for v in ("1.3.0", "1.4.0")}
    tests = {t.metric: t for t in result.tests}
    rate = {v: sum(e) / len(e) for v, e in errors.items()}
    assert tests["error_rate"].difference == pytest.approx(rate["1.4.0"] - rate["1.3.0"])
    assert tests["p50_ms"].difference == pytest.approx(result.b.p50_ms - result.a.p50_ms)
    assert all(t.p_value is not None and 0 <= t.p_value <= 1 for t in result.tests)
    with pytest.raises(LookupError, match=r"9\.9"):
        analytics.compare(rows, "1.3.0", "9.9")


def test_the_tests_agree_with_scipy() -> None:
    np = pytest.importorskip("numpy")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    a, b = rng.lognormal(3.0, 0.5, 300).round(), rng.lognormal(3.1, 0.5, 200).round()  # ties included
    expected = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=False)
    assert mann_whitney(list(a), list(b)) == pytest.approx(expected.pvalue, rel=1e-9)
    for hits_a, n_a, hits_b, n_b in ((45, 100, 60, 100), (3, 250, 12, 240), (80, 90, 81, 90)):
        table = [[hits_a, n_a - hits_a], [hits_b, n_b - hits_b]]
        chi2 = stats.chi2_contingency(table, correction=False)
        assert two_proportions(hits_a, n_a, hits_b, n_b) == pytest.approx(chi2.pvalue, rel=1e-9)


def test_percentiles_polarity_and_windows() -> None:
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 9.0, 3.0, 3.0, 120.0, 7.5]
    for q in (0, 50, 95, 99, 100):
        assert analytics.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert analytics.percentile([], 50) is None
    values = (True, False, 1, -1, 0, 1.0, 0.7, 5, "Yes", "thumbs_down", "meh", None)
    assert [analytics.polarity(v) for v in values] == [
        True, False, True, False, False, True, None, None, True, False, None, None]  # fmt: skip
    assert [analytics.score(v) for v in (True, False, 4, 0.5, "yes")] == [1.0, 0.0, 4.0, 0.5, None]
    assert analytics.parse_since("90m").total_seconds() == 5400 and analytics.parse_since("2w").days == 14
    with pytest.raises(ValueError, match="7 days"):
        analytics.parse_since("7 days")
    assert window_filter(analytics.parse_since("1h"), None, "tags.x = 'y'", now=1000.0) == (
        "trace.timestamp_ms >= -2600000 AND tags.x = 'y'"
    )
    assert window_filter(None, None, None) is None


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`mlflow-ctx report` in this process (its own process: the console-script, terminal and
    HTML tests)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([*CLI[3:], *args])
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("by", ["user", "route"])  # every dimension's figures: the rollup tests above
def test_the_cli_json_and_csv_carry_each_groups_figures(rows: list[TraceRow], by: str) -> None:
    expected = {g.group: g for g in analytics.rollup(rows, by)}
    as_json = run_cli("--by", by, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stderr == ""  # no progress in a pipe
    as_csv = run_cli("--by", by, "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    parsed = {"json": json.loads(as_json.stdout), "csv": list(csv.DictReader(io.StringIO(as_csv.stdout)))}
    for kind, items in parsed.items():
        assert len(items) == len(expected), kind
        for item in items:
            group = expected[item["group"]]
            assert int(item["traces"]) == group.traces and float(item["error_rate"]) == pytest.approx(
                group.error_rate
            )
            assert float(item["p50_ms"]) == pytest.approx(group.p50_ms) and float(
                item["p95_ms"]
            ) == pytest.approx(group.p95_ms)
            assert int(item["feedback_count"]) == group.feedback_count
            share = item["positive_share"]
            assert (
                (share in (None, ""))
                if group.positive_share is None
                else float(share) == pytest.approx(group.positive_share)
            )


def test_the_cli_table_is_aligned_and_says_what_it_read(rows: list[TraceRow]) -> None:
    out = run_cli("--by", "app_version")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{len(rows)} traces in {EXPERIMENT!r}, since 1d"
    header, rule, *body = lines[2:]
    assert header.split()[:4] == ["app_version", "traces", "sessions", "errors"] and set(rule) <= {"-", " "}
    assert len({len(line) for line in [header, rule, *body]}) == 1  # one width: aligned
    groups = analytics.rollup(rows, "app_version")
    assert [line.split()[0] for line in body] == [g.group for g in groups]
    assert [int(line.split()[1].replace(",", "")) for line in body] == [g.traces for g in groups]
    compared = run_cli("--compare", "1.3.0", "1.4.0")
    assert (
        compared.returncode == 0
        and "Mann-Whitney U" in compared.stdout
        and "two-proportion z-test" in compared.stdout
    )


def test_the_cli_says_what_is_wrong() -> None:
    bad = run_cli("--since", "a week")
    assert bad.returncode == 1 and "30m, 12h, 7d" in bad.stderr
    missing = run_cli("--experiment", f"nope-{uuid.uuid4().hex[:6]}")
    assert missing.returncode == 1 and "no experiment named" in missing.stderr
    server_side = run_cli("--server-side", "--by", "user")
    assert server_side.returncode == 1 and "--server-side answers --by route alone" in server_side.stderr
    wrong = run_cli("--by", "planet")
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


def test_the_cli_shows_progress_on_a_terminal(rows: list[TraceRow]) -> None:
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*CLI, "--format", "json"], stdout=subprocess.PIPE, stderr=follower, text=True)
    out, _ = proc.communicate(timeout=120)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.returncode == 0 and len(json.loads(out)) >= 1
    assert f"loading traces from MLflow: {len(rows)}".encode() in seen


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("mlflow-ctx")
    assert script.exists(), "pip install -e . installs `mlflow-ctx`"
    out = subprocess.run([str(script), "report", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--by" in out.stdout


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="no chromium")
def test_the_html_report_renders_offline_in_chromium(rows: list[TraceRow], tmp_path: Path) -> None:
    pytest.importorskip("plotly", reason="the [analytics] extra (lean legs of make compat leave it out)")
    from playwright.sync_api import sync_playwright

    from test_browser import CHROMIUM_FLAGS

    page_path = tmp_path / "report.html"
    command = [
        str(Path(sys.executable).with_name("mlflow-ctx")),
        *CLI[3:],
        "--by",
        "route",
        "--html",
        str(page_path),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"wrote {page_path}" in out.stderr
    errors: list[str] = []
    fetched: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))

        def only_files(route: object) -> None:
            url = route.request.url  # type: ignore[attr-defined]
            fetched.append(url)
            route.continue_() if url.startswith("file:") else route.abort()  # type: ignore[attr-defined]

        page.route("**/*", only_files)
        page.goto(page_path.as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg")
        charts = page.locator(".js-plotly-plot")
        assert charts.count() == 3
        for i in range(3):
            assert charts.nth(i).locator(".main-svg").count() >= 1
        assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 2  # one line per version
        assert page.locator(".js-plotly-plot .barlayer .point").count() == 3  # one bar per route
        links = page.locator("table a")
        assert links.count() >= 1
        href = links.first.get_attribute("href")
        assert (
            href.startswith(f"{os.environ['MLFLOW_TRACKING_URI']}/#/experiments/")
            and "selectedEvaluationId=tr-" in href
        )
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert [url for url in fetched if not url.startswith("file:")] == []  # offline: nothing fetched
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_the_html_report_escapes_what_clients_sent() -> None:
    """User and session ids come from request headers: on the page they are text, never markup."""
    pytest.importorskip("plotly", reason="the [analytics] extra")
    from mlflow_ctx_mw.analytics.fetch import Feedback
    from mlflow_ctx_mw.analytics.html import render

    hostile = "<script>alert(1)</script>"
    rows = [
        TraceRow(trace_id=f"tr-{i:032x}", time_ms=1_800_000_000_000 + i, duration_ms=5.0, ok=True,
                 route=f"GET /{hostile}", user=hostile, session=f"s{hostile}", app_version=hostile,
                 deployment=None, region=None, feedback=(Feedback("user_feedback", False, 0),))
        for i in range(3)
    ]  # fmt: skip
    page = render(rows, by="user", experiment=hostile, experiment_id="1", tracking_uri="http://mlflow",
                  window="1d")  # fmt: skip
    assert hostile not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # in the tables and the title, as text
