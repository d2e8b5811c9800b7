"""Per-route figures from the tracking server's own metrics API: the server aggregates, nothing is
read trace by trace, so it answers in milliseconds at any size. It groups by trace name (our
route) and status only and cannot join ratings to routes, so every other rollup, and feedback,
is read by `fetch`. Needs MLflow 3.10 or newer on both sides."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from mlflow_ctx_mw.analytics.fetch import client, epoch_ms, experiment_id
from mlflow_ctx_mw.analytics.rollups import Group, busiest

__all__ = ["route_rollup"]


def _points(store: Any, experiment: str, metric: str, aggregations: list[Any], dimensions: list[str],
            window: dict[str, int | None]) -> list[Any]:  # fmt: skip
    from mlflow.entities.trace_metrics import MetricViewType

    points, token = [], None
    while True:
        page = store.query_trace_metrics(
            experiment_ids=[experiment], view_type=MetricViewType.TRACES, metric_name=metric,
            aggregations=aggregations, dimensions=dimensions, page_token=token, **window,
        )  # fmt: skip
        points.extend(page)
        token = page.token
        if not token:
            return points


def route_rollup(
    experiment: str, *, since: datetime | timedelta | None = None, until: datetime | timedelta | None = None,
    tracking_uri: str | None = None,
) -> list[Group]:  # fmt: skip
    """Traffic, errors, latency percentiles and tokens per route, computed by the server; the
    feedback and cost fields are empty (the API has no way to them by route)."""
    import time

    tracing = client(tracking_uri)
    store = tracing.store  # MLflow has no public client call for it yet
    if not hasattr(store, "query_trace_metrics"):
        raise LookupError("the tracking server's metrics API needs MLflow 3.10 or newer")
    from mlflow.entities.trace_metrics import AggregationType, MetricAggregation

    found = experiment_id(tracing, experiment)
    now = time.time()
    window = {"start_time_ms": epoch_ms(since, now), "end_time_ms": epoch_ms(until, now)}
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    count = [MetricAggregation(AggregationType.COUNT)]
    for point in _points(store, found, "trace_count", count, ["trace_name", "trace_status"], window):
        name, status = point.dimensions.get("trace_name"), point.dimensions.get("trace_status")
        if name is not None and status in ("OK", "ERROR"):  # not the traces still being written
            counts[name][0] += int(point.values["COUNT"])
            counts[name][1] += int(status == "ERROR" and point.values["COUNT"])
    percentiles = [MetricAggregation(AggregationType.PERCENTILE, q) for q in (50.0, 95.0, 99.0)]
    latency = {p.dimensions.get("trace_name"): p.values
               for p in _points(store, found, "latency", percentiles, ["trace_name"], window)}  # fmt: skip
    total = [MetricAggregation(AggregationType.SUM)]
    tokens = {p.dimensions.get("trace_name"): p.values.get("SUM")
              for p in _points(store, found, "total_tokens", total, ["trace_name"], window)}  # fmt: skip
    groups = []
    for name, (traces, errors) in counts.items():
        values = latency.get(name, {})
        used = tokens.get(name)
        groups.append(Group(
            group=name, traces=traces, sessions=None, errors=errors,
            error_rate=errors / traces if traces else 0.0,
            p50_ms=values.get("P50.0"), p95_ms=values.get("P95.0"), p99_ms=values.get("P99.0"),
            feedback_count=0, positive=0, negative=0, positive_share=None, feedback=(),
            input_tokens=None, output_tokens=None, total_tokens=None if used is None else int(used),
            cost=None, first_ms=0, last_ms=0,
        ))  # fmt: skip
    return busiest(groups)
