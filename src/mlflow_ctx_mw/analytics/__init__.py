"""Who is unhappy, which sessions went wrong, did a version help, which route is slow, what each
user costs: rollups over what the middleware recorded, read back from MLflow.

    from mlflow_ctx_mw import analytics
    rows = analytics.fetch("chat-app", since=timedelta(days=7))
    for group in analytics.rollup(rows, by="app_version"): ...

Never imported by the middleware: a tool for people, `mlflow-ctx report` on the command line.
"""

from mlflow_ctx_mw.analytics.fetch import Feedback, TraceRow, client, experiment_id, fetch, parse_since
from mlflow_ctx_mw.analytics.rollups import (
    DIMENSIONS,
    Comparison,
    FeedbackSummary,
    Group,
    Test,
    Turn,
    compare,
    percentile,
    polarity,
    rollup,
    score,
    session_turns,
    summarise,
    timeline,
    worst,
)
from mlflow_ctx_mw.analytics.server import route_rollup

__all__ = [
    "DIMENSIONS", "Comparison", "Feedback", "FeedbackSummary", "Group", "Test", "TraceRow", "Turn",
    "client", "compare", "experiment_id", "fetch", "parse_since", "percentile", "polarity", "rollup",
    "route_rollup", "score", "session_turns", "summarise", "timeline", "worst",
]  # fmt: skip
