"""Rollups over fetched trace rows: per group, a session's turns, the unhappiest groups, a
version comparison and a timeline. Pure functions: no MLflow here, so every number can be
checked against counts computed another way."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mlflow_ctx_mw.analytics.fetch import Feedback, TraceRow

__all__ = [
    "DIMENSIONS", "Comparison", "FeedbackSummary", "Group", "Test", "Turn",
    "compare", "percentile", "polarity", "rollup", "score", "session_turns", "summarise", "timeline", "worst",
]  # fmt: skip

DIMENSIONS: dict[str, Callable[[TraceRow], str | None]] = {
    "user": lambda row: row.user,
    "session": lambda row: row.session,
    "app_version": lambda row: row.app_version,
    "deployment": lambda row: row.deployment,
    "region": lambda row: row.region,
    "route": lambda row: row.route,
}
POSITIVE = frozenset({"yes", "y", "true", "good", "positive", "up", "thumbs_up", "like", "helpful"})
NEGATIVE = frozenset({"no", "n", "false", "bad", "negative", "down", "thumbs_down", "dislike", "unhelpful"})
SIGNIFICANCE = 0.05


def polarity(value: Any) -> bool | None:
    """Is a feedback value positive? `True`/`False`; thumbs as numbers (1 against 0 or -1); a
    word such as yes/no, good/bad, up/down. None: not a polar value (text; a scale such as 1-5
    stars or a 0.0-1.0 score, read through its mean score instead)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value == 1 if value in (-1, 0, 1) else None
    if isinstance(value, str):
        word = value.strip().lower()
        return True if word in POSITIVE else False if word in NEGATIVE else None
    return None


def score(value: Any) -> float | None:
    """A feedback value as a number (True is 1): what a mean score averages."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated between the nearest ranks (NumPy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class FeedbackSummary:
    name: str
    count: int
    positive: int
    negative: int
    positive_share: float | None  # of the polar values; None when none is
    mean_score: float | None  # of the numeric values; None when none is


@dataclass(frozen=True)
class Group:
    """One group's traffic, errors, latency, feedback and usage."""

    group: str | None
    traces: int
    sessions: int | None  # distinct sessions among the traces (None: not known)
    errors: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    feedback_count: int
    positive: int
    negative: int
    positive_share: float | None
    feedback: tuple[FeedbackSummary, ...]
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    cost: float | None
    first_ms: int
    last_ms: int

    def row(self) -> dict[str, Any]:
        """The flat row JSON and CSV carry: ratios 0-1, None where there is nothing to measure."""
        flat = {k: v for k, v in asdict(self).items() if k != "feedback"}
        for summary in self.feedback:
            flat[f"mean_score[{summary.name}]"] = summary.mean_score
            flat[f"positive_share[{summary.name}]"] = summary.positive_share
        return flat


def _summaries(items: Iterable[Feedback]) -> tuple[FeedbackSummary, ...]:
    by_name: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        by_name[item.name].append(item.value)
    out = []
    for name in sorted(by_name):
        values = by_name[name]
        polar = [p for p in map(polarity, values) if p is not None]
        scores = [s for s in map(score, values) if s is not None]
        out.append(FeedbackSummary(
            name=name, count=len(values), positive=sum(polar), negative=len(polar) - sum(polar),
            positive_share=sum(polar) / len(polar) if polar else None,
            mean_score=sum(scores) / len(scores) if scores else None,
        ))  # fmt: skip
    return tuple(out)


def _sum(values: Iterable[float | int | None]) -> Any:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def summarise(key: str | None, rows: Sequence[TraceRow]) -> Group:
    """One group's figures from its rows."""
    durations = [row.duration_ms for row in rows if row.duration_ms is not None]
    errors = sum(1 for row in rows if not row.ok)
    summaries = _summaries(item for row in rows for item in row.feedback)
    positive = sum(s.positive for s in summaries)
    negative = sum(s.negative for s in summaries)
    return Group(
        group=key, traces=len(rows), sessions=len({row.session for row in rows if row.session is not None}),
        errors=errors, error_rate=errors / len(rows) if rows else 0.0,
        p50_ms=percentile(durations, 50), p95_ms=percentile(durations, 95), p99_ms=percentile(durations, 99),
        feedback_count=sum(s.count for s in summaries), positive=positive, negative=negative,
        positive_share=positive / (positive + negative) if positive + negative else None,
        feedback=summaries,
        input_tokens=_sum(row.input_tokens for row in rows),
        output_tokens=_sum(row.output_tokens for row in rows),
        total_tokens=_sum(row.total_tokens for row in rows),
        cost=_sum(row.cost for row in rows),
        first_ms=min((row.time_ms for row in rows), default=0),
        last_ms=max((row.time_ms for row in rows), default=0),
    )  # fmt: skip


def grouped(rows: Iterable[TraceRow], by: str) -> dict[str | None, list[TraceRow]]:
    if by not in DIMENSIONS:
        raise ValueError(f"by: expected one of {', '.join(DIMENSIONS)}, got {by!r}")
    key = DIMENSIONS[by]
    groups: dict[str | None, list[TraceRow]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return groups


def rollup(rows: Iterable[TraceRow], by: str) -> list[Group]:
    """Per user, session, app_version, deployment, region or route; the busiest first. Traces
    without the field form the group None."""
    return busiest(summarise(key, items) for key, items in grouped(rows, by).items())


def busiest(groups: Iterable[Group]) -> list[Group]:
    """Most traces first; ties by name, the group None last."""
    return sorted(groups, key=lambda g: (-g.traces, g.group is None, g.group or ""))


def worst(rows: Iterable[TraceRow], by: str = "session", limit: int = 10) -> list[Group]:
    """The groups with the most negative feedback (then the lowest positive share)."""
    unhappy = [g for g in rollup(rows, by) if g.negative and g.group is not None]
    unhappy.sort(key=lambda g: (-g.negative, g.positive_share or 0.0, g.group or ""))
    return unhappy[:limit]


@dataclass(frozen=True)
class Turn:
    trace_id: str
    time_ms: int
    route: str | None
    duration_ms: float | None
    ok: bool
    request_id: str | None
    feedback: tuple[Feedback, ...]


def session_turns(rows: Iterable[TraceRow], session: str) -> list[Turn]:
    """A conversation's turns in the order they were served, each with its feedback."""
    mine = sorted((row for row in rows if row.session == session), key=lambda row: row.time_ms)
    return [Turn(row.trace_id, row.time_ms, row.route, row.duration_ms, row.ok, row.request_id, row.feedback)
            for row in mine]  # fmt: skip


@dataclass(frozen=True)
class Test:
    """One metric, A against B: the difference (B - A) and whether it is more than noise."""

    metric: str
    a: float | None
    b: float | None
    difference: float | None
    p_value: float | None
    method: str

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < SIGNIFICANCE


@dataclass(frozen=True)
class Comparison:
    by: str
    a: Group
    b: Group
    tests: tuple[Test, ...]


def _normal_sf(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return math.erfc(abs(z) / math.sqrt(2))


def two_proportions(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float | None:
    """Two-proportion z-test (pooled): are two rates the same?"""
    if not n_a or not n_b:
        return None
    pooled = (hits_a + hits_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:
        return 1.0
    return _normal_sf((hits_b / n_b - hits_a / n_a) / spread)


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Mann-Whitney U (normal approximation, tie-corrected): do latencies differ? Latency is
    skewed, so a rank test, not a t-test."""
    n_a, n_b = len(a), len(b)
    if not n_a or not n_b:
        return None
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    rank_a, ties, i = 0.0, 0.0, 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        mid = (i + j) / 2 + 1
        rank_a += mid * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        size = j - i + 1
        ties += size**3 - size
        i = j + 1
    u = rank_a - n_a * (n_a + 1) / 2
    n = n_a + n_b
    variance = n_a * n_b / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return 1.0
    return _normal_sf((u - n_a * n_b / 2) / math.sqrt(variance))


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def compare(rows: Iterable[TraceRow], a: str, b: str, by: str = "app_version") -> Comparison:
    """Group `a` against group `b` (two app versions, say): error rate and positive share by a
    two-proportion z-test, latency by Mann-Whitney U; significant at p < 0.05."""
    groups = grouped(rows, by)
    missing = [name for name in (a, b) if name not in groups]
    if missing:
        raise LookupError(f"no traces with {by} = {', '.join(map(repr, missing))}")
    ga, gb = summarise(a, groups[a]), summarise(b, groups[b])
    durations = [[r.duration_ms for r in groups[k] if r.duration_ms is not None] for k in (a, b)]
    tests = (
        Test("error_rate", ga.error_rate, gb.error_rate, gb.error_rate - ga.error_rate,
             two_proportions(ga.errors, ga.traces, gb.errors, gb.traces), "two-proportion z-test"),
        Test("positive_share", ga.positive_share, gb.positive_share,
             _diff(ga.positive_share, gb.positive_share),
             two_proportions(ga.positive, ga.positive + ga.negative, gb.positive, gb.positive + gb.negative),
             "two-proportion z-test"),
        Test("p50_ms", ga.p50_ms, gb.p50_ms, _diff(ga.p50_ms, gb.p50_ms), mann_whitney(*durations),
             "Mann-Whitney U"),
    )  # fmt: skip
    return Comparison(by, ga, gb, tests)


def timeline(rows: Iterable[TraceRow], by: str, bucket_ms: int) -> list[tuple[int, Group]]:
    """Per group and time bucket: (the bucket's start, its figures), in time order per group;
    what the report's charts plot."""
    buckets: dict[tuple[str, int], list[TraceRow]] = defaultdict(list)
    for key, items in grouped(rows, by).items():
        for row in items:
            buckets[(key or "", row.time_ms // bucket_ms * bucket_ms)].append(row)
    return [(start, summarise(key or None, items)) for (key, start), items in sorted(buckets.items())]
