"""Read an experiment's traces as flat rows: one paged search without spans, so a report of
100,000 traces holds 100,000 small rows, never their spans."""

from __future__ import annotations

import inspect
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = [
    "Feedback",
    "TraceRow",
    "client",
    "epoch_ms",
    "experiment_id",
    "fetch",
    "parse_since",
    "window_filter",
]

PAGE = 500  # the most a tracking server returns per search page
TRACE_NAME = "mlflow.traceName"
USER, SESSION = "mlflow.trace.user", "mlflow.trace.session"
TOKENS, COST = "mlflow.trace.tokenUsage", "mlflow.trace.cost"
_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Feedback:
    """One feedback assessment on a trace (expectations are not opinions: left out)."""

    name: str
    value: Any
    time_ms: int
    source: str | None = None


@dataclass(frozen=True)
class TraceRow:
    """What one trace contributes to every rollup."""

    trace_id: str
    time_ms: int
    duration_ms: float | None
    ok: bool
    route: str | None
    user: str | None
    session: str | None
    app_version: str | None
    deployment: str | None
    region: str | None
    request_id: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cost: float | None = None
    feedback: tuple[Feedback, ...] = field(default_factory=tuple)


def parse_since(text: str) -> timedelta:
    """`30m`, `12h`, `7d`, `2w`: how far back a report looks."""
    match = _SPAN.match(text)
    if match is None:
        raise ValueError(f"expected a span like 30m, 12h, 7d or 2w, got {text!r}")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def epoch_ms(moment: datetime | timedelta | None, now: float) -> int | None:
    """A moment (a time, naive meaning UTC; or a span back from `now`) in MLflow's epoch ms."""
    if moment is None:
        return None
    if isinstance(moment, timedelta):
        return int((now - moment.total_seconds()) * 1000)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def window_filter(
    since: datetime | timedelta | None = None, until: datetime | timedelta | None = None,
    extra: str | None = None, *, now: float | None = None,
) -> str | None:  # fmt: skip
    """The search filter for a time window and a caller's own MLflow filter. Only numbers we
    computed are pasted in; `extra` is the caller's filter, passed on as they wrote it."""
    now = time.time() if now is None else now
    parts = []
    if (start := epoch_ms(since, now)) is not None:
        parts.append(f"trace.timestamp_ms >= {start}")
    if (end := epoch_ms(until, now)) is not None:
        parts.append(f"trace.timestamp_ms < {end}")
    if extra and extra.strip():
        parts.append(extra.strip())
    return " AND ".join(parts) or None


def client(tracking_uri: str | None = None) -> Any:
    """MLflow's tracing client: in the lean `mlflow-tracing` package too (MlflowClient is not)."""
    from mlflow.tracing.client import TracingClient

    return TracingClient(tracking_uri)


def experiment_id(client: Any, experiment: str) -> str:
    """An experiment's id from its name (or its id, as given)."""
    found = client.store.get_experiment_by_name(experiment)
    if found is not None:
        return str(found.experiment_id)
    if experiment.isdigit():
        return experiment
    raise LookupError(f"no experiment named {experiment!r} on {client.tracking_uri}")


def fetch(
    experiment: str, *, since: datetime | timedelta | None = None, until: datetime | timedelta | None = None,
    filter_string: str | None = None, tracking_uri: str | None = None, progress: Progress | None = None,
) -> list[TraceRow]:  # fmt: skip
    """Every trace of `experiment` in the window (newest last), without spans."""
    return list(iter_rows(experiment, since=since, until=until, filter_string=filter_string,
                          tracking_uri=tracking_uri, progress=progress))  # fmt: skip


def iter_rows(
    experiment: str, *, since: datetime | timedelta | None = None, until: datetime | timedelta | None = None,
    filter_string: str | None = None, tracking_uri: str | None = None, progress: Progress | None = None,
) -> Iterator[TraceRow]:  # fmt: skip
    tracing = client(tracking_uri)
    where = {
        "locations" if _takes_locations(tracing) else "experiment_ids": [experiment_id(tracing, experiment)]
    }
    query = window_filter(since, until, filter_string)
    token, count = None, 0
    while True:
        page = tracing.search_traces(
            **where, filter_string=query, max_results=PAGE, order_by=["timestamp_ms ASC"],
            page_token=token, include_spans=False,
        )  # fmt: skip
        for trace in page:
            count += 1
            if _finished(trace.info):
                yield to_row(trace.info)
        if progress is not None:
            progress(count)
        token = page.token
        if not token:
            return


def _takes_locations(client: Any) -> bool:
    return "locations" in inspect.signature(client.search_traces).parameters


def _finished(info: Any) -> bool:
    """Whole: OK or ERROR, and named. MLflow exports a trace's spans before its info, so for a
    moment the server holds a trace with neither its name nor its metadata; counted, it would
    be a request of nobody's, with no version."""
    state = str(getattr(info.state, "value", info.state))
    return state in ("OK", "ERROR") and TRACE_NAME in (info.tags or {})


def to_row(info: Any) -> TraceRow:
    """One MLflow TraceInfo, flattened (fields MLflow has had since 3.0)."""
    meta: dict[str, str] = dict(info.trace_metadata or {})
    tags: dict[str, str] = dict(info.tags or {})
    usage = _json(meta.get(TOKENS))
    cost = _json(meta.get(COST))
    state = str(getattr(info.state, "value", info.state))
    return TraceRow(
        trace_id=info.trace_id,
        time_ms=int(info.request_time),
        duration_ms=None if info.execution_duration is None else float(info.execution_duration),
        ok=state == "OK",
        route=tags.get(TRACE_NAME),
        user=meta.get(USER) or tags.get(USER),
        session=meta.get(SESSION) or tags.get(SESSION),
        app_version=meta.get("app_version"),
        deployment=meta.get("deployment_id"),
        region=meta.get("region"),
        request_id=getattr(info, "client_request_id", None),
        input_tokens=_int(usage.get("input_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
        total_tokens=_int(usage.get("total_tokens")),
        cost=_float(cost.get("total_cost")),
        feedback=tuple(_feedback(a) for a in (getattr(info, "assessments", None) or []) if _is_feedback(a)),
    )


def _is_feedback(assessment: Any) -> bool:
    return (
        getattr(assessment, "feedback", None) is not None and getattr(assessment, "valid", True) is not False
    )


def _feedback(assessment: Any) -> Feedback:
    source = getattr(assessment, "source", None)
    return Feedback(
        name=assessment.name,
        value=assessment.feedback.value,
        time_ms=int(getattr(assessment, "create_time_ms", 0) or 0),
        source=getattr(source, "source_id", None),
    )


def _json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
