"""The report as one self-contained HTML page: Plotly's charts with plotly.js inlined, so the file
opens offline, from a mail attachment or a CI artifact. Needs the `[analytics]` extra."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode

from mlflow_ctx_mw.analytics.fetch import TraceRow
from mlflow_ctx_mw.analytics.rollups import Group, polarity, rollup, timeline, worst

__all__ = ["render", "trace_url"]

MINUTE_MS = 60_000
STEPS_MS = tuple(m * MINUTE_MS for m in (1, 5, 15, 60, 360, 1440, 10080))


def trace_url(tracking_uri: str, experiment_id: str, trace_id: str) -> str:
    """A trace opened in MLflow's UI (the traces tab with the trace selected)."""
    query = urlencode({"selectedEvaluationId": trace_id, "traceId": trace_id})
    return f"{tracking_uri.rstrip('/')}/#/experiments/{quote(experiment_id)}/traces?{query}"


def _bucket_ms(rows: Sequence[TraceRow]) -> int:
    """The smallest step that draws a window in at most 60 points a line."""
    span = rows[-1].time_ms - rows[0].time_ms if rows else 0
    return next((step for step in STEPS_MS if span / step <= 60), STEPS_MS[-1])


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def _figures(rows: Sequence[TraceRow]) -> list[tuple[str, Any]]:
    import plotly.graph_objects as go
    from plotly import colors

    bucket = _bucket_ms(rows)
    series = timeline(rows, "app_version", bucket)
    share, latency = go.Figure(), go.Figure()
    palette = colors.qualitative.Plotly
    for i, version in enumerate(sorted({g.group or "(none)" for _, g in series})):
        points = [(start, g) for start, g in series if (g.group or "(none)") == version]
        x = [_iso(start) for start, _ in points]
        color = palette[i % len(palette)]  # one color per version, in both charts
        share.add_trace(go.Scatter(x=x, y=[g.positive_share for _, g in points], name=version,
                                   mode="lines+markers", line={"color": color}))  # fmt: skip
        latency.add_trace(go.Scatter(x=x, y=[g.p50_ms for _, g in points], name=f"{version} p50",
                                     mode="lines+markers", line={"color": color}))  # fmt: skip
        latency.add_trace(go.Scatter(x=x, y=[g.p95_ms for _, g in points], name=f"{version} p95",
                                     mode="lines", line={"color": color, "dash": "dot"}))  # fmt: skip
    share.update_layout(yaxis={"title": "positive share", "range": [0, 1], "tickformat": ".0%"})
    latency.update_layout(yaxis={"title": "latency (ms)"})
    routes = rollup(rows, "route")
    errors = go.Figure(go.Bar(x=[g.group or "(none)" for g in routes], y=[g.error_rate for g in routes],
                              text=[f"{g.errors}/{g.traces}" for g in routes]))  # fmt: skip
    errors.update_layout(yaxis={"title": "error rate", "tickformat": ".1%"})
    charts = [("Feedback: positive share per app_version", share),
              ("Latency per app_version", latency), ("Error rate per route", errors)]  # fmt: skip
    for _, figure in charts:
        figure.update_layout(height=360, margin={"l": 60, "r": 20, "t": 20, "b": 60}, template="plotly_white")
    return charts


def _cell(value: Any, percent: bool = False) -> str:
    if value is None:
        return "<td class=none>-</td>"
    if percent:
        return f"<td class=num>{value:.1%}</td>"
    if isinstance(value, float):
        return f"<td class=num>{value:,.4f}</td>" if value < 10 else f"<td class=num>{value:,.1f}</td>"
    if isinstance(value, int):
        return f"<td class=num>{value:,}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def _table(groups: Sequence[Group], by: str, links: dict[str, str] | None = None) -> str:
    head = [by, "traces", "error rate", "p50 ms", "p95 ms", "p99 ms", "feedback", "negative",
            "positive share", "tokens", "cost"]  # fmt: skip
    body = []
    for g in groups:
        name = html.escape(g.group if g.group is not None else "(none)")
        if links and g.group in links:
            name = f'<a href="{html.escape(links[g.group])}">{name}</a>'
        cells = [g.traces, g.error_rate, g.p50_ms, g.p95_ms, g.p99_ms, g.feedback_count, g.negative,
                 g.positive_share, g.total_tokens, g.cost]  # fmt: skip
        shown = [_cell(value, percent=i in (1, 7)) for i, value in enumerate(cells)]
        body.append(f"<tr><td>{name}</td>{''.join(shown)}</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:32px}table{border-collapse:collapse;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}td.num{text-align:right}
td.none{color:#999;text-align:right}.meta{color:#666}
"""


def render(
    rows: Sequence[TraceRow], *, by: str, experiment: str, experiment_id: str, tracking_uri: str,
    window: str, limit: int = 50,
) -> str:  # fmt: skip
    """The page: charts, the rollup `by` a dimension, the unhappiest sessions linked into MLflow."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    sections = []
    for title, figure in _figures(rows):
        div = pio.to_html(figure, full_html=False, include_plotlyjs=False, config={"displaylogo": False})
        sections.append(f"<h2>{html.escape(title)}</h2>{div}")
    unhappy = worst(rows, "session", limit=20)
    latest_negative = {}
    for row in rows:  # rows are oldest first: the last one wins
        if row.session and any(polarity(f.value) is False for f in row.feedback):
            latest_negative[row.session] = trace_url(tracking_uri, experiment_id, row.trace_id)
    sections.append(
        "<h2>Unhappiest sessions (most negative feedback; linked to its latest such turn)</h2>"
        + (_table(unhappy, "session", latest_negative) if unhappy else "<p>No negative feedback.</p>")
    )
    sections.append(f"<h2>By {html.escape(by)}</h2>" + _table(rollup(rows, by)[:limit], by))
    span = f"{_iso(rows[0].time_ms)} to {_iso(rows[-1].time_ms)} UTC" if rows else "no traces"
    now = _iso(int(time.time() * 1000))
    meta = (f"Experiment {experiment} (id {experiment_id}) on {tracking_uri}: {len(rows):,} traces, "
            f"window {window} ({span}). Generated {now} UTC by mlflow-ctx.")  # fmt: skip
    title = f"mlflow-ctx report: {experiment}"
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=meta>{html.escape(meta)}</p>"
        + "".join(sections)
        + "</body></html>"
    )
