"""`mlflow-ctx report`: the analytics on the command line. Tables for a terminal, JSON or CSV for
a pipe, a self-contained HTML page for people.

    mlflow-ctx report --experiment chat-app --since 7d --by user
    mlflow-ctx report --experiment chat-app --by app_version --format csv > versions.csv
    mlflow-ctx report --experiment chat-app --compare 1.3.0 1.4.0
    mlflow-ctx report --experiment chat-app --session s-42
    mlflow-ctx report --experiment chat-app --html report.html
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import IO, Any

from mlflow_ctx_mw import analytics
from mlflow_ctx_mw.analytics.rollups import Comparison, Group, Turn

__all__ = ["main"]

#: The table's columns: (header, Group field, format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("traces", "traces", "{:,}"),
    ("sessions", "sessions", "{:,}"),
    ("errors", "error_rate", "{:.1%}"),
    ("p50 ms", "p50_ms", "{:,.0f}"),
    ("p95 ms", "p95_ms", "{:,.0f}"),
    ("p99 ms", "p99_ms", "{:,.0f}"),
    ("feedback", "feedback_count", "{:,}"),
    ("positive", "positive_share", "{:.0%}"),
    ("tokens", "total_tokens", "{:,}"),
    ("cost", "cost", "{:,.4f}"),
)


OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--experiment",), {"required": True, "help": "name (or id) of the MLflow experiment"}),
    (("--since",), {"default": "7d", "help": "how far back: 30m, 12h, 7d, 2w, or 'all' (default 7d)"}),
    (
        ("--filter",),
        {"dest": "filter_string", "help": "an extra MLflow trace filter, AND-ed with the window"},
    ),
    (
        ("--by",),
        {"choices": list(analytics.DIMENSIONS), "help": "group by (user; app_version with --compare)"},
    ),
    (("--format",), {"choices": ["table", "json", "csv"], "default": "table"}),
    (("--limit",), {"type": int, "default": 50, "help": "at most this many groups in a table (50)"}),
    (("--worst",), {"type": int, "metavar": "N", "help": "the N groups with the most negative feedback"}),
    (
        ("--compare",),
        {"nargs": 2, "metavar": ("A", "B"), "help": "group A against B, with significance tests"},
    ),
    (("--session",), {"help": "one session's turns in order, with their feedback"}),
    (("--html",), {"metavar": "PATH", "help": "also write a self-contained HTML report here"}),
    (
        ("--server-side",),
        {
            "action": "store_true",
            "help": "per route, aggregated by the tracking server's "
            "metrics API (MLflow >= 3.10): no trace is read, no feedback or cost columns",
        },
    ),
    (("--tracking-uri",), {"help": "default: MLFLOW_TRACKING_URI"}),
)
#: What the metrics API cannot say per route.
TRACE_ONLY = frozenset({"sessions", "feedback_count", "positive_share", "cost"})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlflow-ctx", description="Read what mlflow-ctx-mw recorded.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="rollups per user, session, version, deployment, region or route",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for names, settings in OPTIONS:
        report.add_argument(*names, **settings)
    return parser


def _progress(stream: IO[str]) -> Callable[[int], None] | None:
    """A count on one line while pages load, only on a terminal (never in a pipe's output)."""
    if not stream.isatty():
        return None

    def show(count: int) -> None:
        stream.write(f"\rloading traces from MLflow: {count:,}")
        stream.flush()

    return show


def _fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def table(groups: Sequence[Group], by: str, skip: frozenset[str] = frozenset()) -> str:
    """Aligned columns: names left, numbers right."""
    columns = [column for column in COLUMNS if column[1] not in skip]
    header = [by, *(name for name, _, _ in columns)]
    lines = [
        [g.group if g.group is not None else "(none)", *(_fmt(getattr(g, f), p) for _, f, p in columns)]
        for g in groups
    ]
    return _aligned(header, lines, numbers=True)


def _aligned(header: list[str], lines: list[list[str]], numbers: bool = False) -> str:
    """Columns padded to their widest cell; with `numbers`, all but the first right-aligned."""
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.rjust(w) if numbers and i else c.ljust(w) for i, (c, w) in enumerate(cells))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, lines)])


def _csv(rows: Sequence[dict[str, Any]], out: IO[str]) -> None:
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    writer = csv.DictWriter(out, fieldnames=list(fields) or ["group"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def _turn(turn: Turn) -> dict[str, Any]:
    return {"trace_id": turn.trace_id, "time": _iso(turn.time_ms), "route": turn.route,
            "duration_ms": turn.duration_ms, "ok": turn.ok, "request_id": turn.request_id,
            "feedback": "; ".join(f"{f.name}={f.value}" for f in turn.feedback) or None}  # fmt: skip


def _comparison(result: Comparison) -> list[dict[str, Any]]:
    a, b = result.a.group or "a", result.b.group or "b"
    traces = analytics.Test(
        "traces", result.a.traces, result.b.traces, result.b.traces - result.a.traces, None, "-"
    )
    return [
        {"metric": t.metric, a: t.a, b: t.b, "difference": t.difference, "p_value": t.p_value,
         "significant": t.significant if t.p_value is not None else None, "test": t.method}
        for t in (traces, *result.tests)
    ]  # fmt: skip


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def _plain(rows: Sequence[dict[str, Any]]) -> str:
    """Dict rows (turns, a comparison) as aligned text."""
    if not rows:
        return "(nothing)"
    keys = list(rows[0])
    return _aligned(keys, [[_text(row.get(k)) for k in keys] for row in rows])


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _server_side(args: argparse.Namespace, since: Any) -> tuple[list[dict[str, Any]], str, str]:
    other = [f"--{n}" for n in ("filter", "compare", "session", "worst", "html")
             if getattr(args, "filter_string" if n == "filter" else n)]  # fmt: skip
    if (args.by or "route") != "route" or other:
        raise ValueError(
            f"--server-side answers --by route alone, not {' '.join(other or ['--by ' + args.by])}"
        )
    groups = analytics.route_rollup(args.experiment, since=since, tracking_uri=args.tracking_uri)
    keys = ("group", "traces", "errors", "error_rate", "p50_ms", "p95_ms", "p99_ms", "total_tokens")
    rows = [{key: getattr(g, key) for key in keys} for g in groups]
    total = sum(g.traces for g in groups)
    title = f"{total:,} traces in {args.experiment!r}, since {args.since} (server-side)"
    return rows, title, table(groups[: args.limit], "route", TRACE_ONLY)


def _from_traces(args: argparse.Namespace, since: Any, err: IO[str]) -> tuple[list[dict[str, Any]], str, str]:
    progress = _progress(err)
    rows = analytics.fetch(args.experiment, since=since, filter_string=args.filter_string,
                           tracking_uri=args.tracking_uri, progress=progress)  # fmt: skip
    if progress is not None:
        err.write("\r\033[K")
    by = args.by or ("app_version" if args.compare else "user")
    title = f"{len(rows):,} traces in {args.experiment!r}, since {args.since}"
    if args.html:
        _write_html(args, rows, by, err)
    if args.session is not None:
        result = [_turn(t) for t in analytics.session_turns(rows, args.session)]
        return result, title, _plain(result)
    if args.compare:
        result = _comparison(analytics.compare(rows, args.compare[0], args.compare[1], by=by))
        return result, title, _plain(result)
    groups = analytics.worst(rows, by, args.worst) if args.worst else analytics.rollup(rows, by)
    return [g.row() for g in groups], title, table(groups[: args.limit], by)


def _write_html(args: argparse.Namespace, rows: list[analytics.TraceRow], by: str, err: IO[str]) -> None:
    from mlflow_ctx_mw.analytics.html import render

    tracing = analytics.client(args.tracking_uri)
    found = analytics.experiment_id(tracing, args.experiment)
    page = render(rows, by=by, experiment=args.experiment, experiment_id=found,
                  tracking_uri=tracing.tracking_uri, window=args.since)  # fmt: skip
    with open(args.html, "w", encoding="utf-8") as file:
        file.write(page)
    err.write(f"wrote {os.path.abspath(args.html)}\n")


def report(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    since = None if args.since == "all" else analytics.parse_since(args.since)
    if args.server_side:
        result, title, text = _server_side(args, since)
    else:
        result, title, text = _from_traces(args, since, err)
    if args.format == "json":
        json.dump(result, out, indent=2)
        out.write("\n")
    elif args.format == "csv":
        _csv(result, out)
    else:
        out.write(f"{title}\n\n{text}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return report(args, sys.stdout, sys.stderr)
    except (LookupError, ValueError) as exc:
        sys.stderr.write(f"mlflow-ctx: {exc}\n")
        return 1
    except ImportError as exc:
        sys.stderr.write(
            f"mlflow-ctx: {exc}; the HTML report needs `pip install 'mlflow-ctx-mw[analytics]'`\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
