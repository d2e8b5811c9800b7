"""Export health. MLflow drops traces when the tracking server ingests slower than the app
produces them (one warning per 30 s at best), evicts them silently from its in-memory buffer when
more than MLFLOW_TRACE_BUFFER_MAX_SIZE wait there, and warns once per trace when the server is
down. All are counted here, readable by the app (`export_stats()`), and logged at most once a minute:
a warning that names the knobs for drops, MLflow's own warning for failures. With the spool on
(replay.py), what MLflow cannot take is kept on disk and counted here too."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from mlflow_ctx_mw import _exporter

__all__ = ["ExportStats", "export_stats", "watch_exports"]

logger = logging.getLogger("mlflow_ctx_mw")
WARN_EVERY_SECONDS = 60.0

_lock = threading.Lock()
_dropped_exports = 0
_dropped_spans = 0
_evicted_traces = 0
_failed_exports = 0
_last_warning = -WARN_EVERY_SECONDS
_last_failure_log = -WARN_EVERY_SECONDS
_installed = False


@dataclass(frozen=True)
class ExportStats:
    #: Export tasks MLflow discarded (about two per trace: its spans, its trace info).
    dropped_exports: int
    #: Spans OpenTelemetry's batch processor discarded before MLflow saw them.
    dropped_spans: int
    #: Export calls that failed (server down, 5xx, timeouts) after MLflow's own retries.
    failed_exports: int
    #: Traces MLflow evicted from its full in-memory buffer before they were exported.
    evicted_traces: int = 0
    #: Ratings the feedback endpoint accepted (202), and of those: stored (new or updated),
    #: updated (a user's second rating under a name), refused at delivery (not the app's trace,
    #: or not the user's; several traces with the client request id), dropped (no trace by the
    #: deadline, or MLflow failing throughout).
    feedback_accepted: int = 0
    feedback_delivered: int = 0
    feedback_updated: int = 0
    feedback_refused: int = 0
    feedback_dropped: int = 0
    #: The spool (all 0 with it off). Entries written (traces, and ratings of those accepted),
    #: traces replayed into MLflow, entries dropped: past the spool's bounds (expired), refused
    #: by the server for good (rejected), unreadable (corrupt), or not writable (disk full,
    #: read-only: dropped as without a spool). Bytes and entries on disk (all processes').
    spooled_traces: int = 0
    spooled_feedback: int = 0
    replayed_traces: int = 0
    expired_entries: int = 0
    rejected_entries: int = 0
    corrupt_entries: int = 0
    unwritable_entries: int = 0
    spool_bytes: int = 0
    spool_entries: int = 0


def export_stats() -> ExportStats:
    from mlflow_ctx_mw.delivery import COUNTS as feedback
    from mlflow_ctx_mw.replay import SPOOLER
    from mlflow_ctx_mw.spool import SpoolFiles

    files, spooler = SPOOLER.files, SPOOLER.counts
    disk = files.counts if files is not None else SpoolFiles.no_counts()
    return ExportStats(
        _dropped_exports,
        _dropped_spans,
        _failed_exports,
        _evicted_traces,
        feedback.accepted,
        feedback.delivered,
        feedback.updated,
        feedback.refused,
        feedback.dropped,
        spooled_traces=disk["written"] - spooler["feedback_spooled"],
        spooled_feedback=spooler["feedback_spooled"],
        replayed_traces=spooler["replayed"],
        expired_entries=disk["expired"],
        rejected_entries=spooler["rejected"],
        corrupt_entries=disk["corrupt"],
        unwritable_entries=disk["unwritable"],
        spool_bytes=files.bytes if files is not None else 0,
        spool_entries=files.entries if files is not None else 0,
    )


def _failed() -> bool:
    """Count an export failure; let MLflow's own warning through at most once a minute."""
    global _failed_exports, _last_failure_log
    with _lock:
        _failed_exports += 1
        now = time.monotonic()
        if now - _last_failure_log < WARN_EVERY_SECONDS:
            return False
        _last_failure_log = now
        failed = _failed_exports
    from mlflow_ctx_mw.replay import SPOOLER

    fate = "kept in the spool and sent when it answers" if SPOOLER.active else "lost"
    logger.warning(
        "MLflow could not export traces (%d failures so far; MLflow's warning follows, then at most "
        "one a minute): requests are served as usual, their traces are %s.",
        failed,
        fate,
    )
    return True


def _dropped(kind: str) -> None:
    global _dropped_exports, _dropped_spans, _evicted_traces, _last_warning
    with _lock:
        if kind == "export":
            _dropped_exports += 1
        elif kind == "evicted":
            _evicted_traces += 1
        else:
            _dropped_spans += 1
        now = time.monotonic()
        if now - _last_warning < WARN_EVERY_SECONDS:
            return
        _last_warning = now
        exports, spans, evicted = _dropped_exports, _dropped_spans, _evicted_traces
    logger.warning(
        "MLflow dropped traces: %d export tasks, %d spans and %d buffered traces so far. The "
        "tracking server ingests slower than this app produces traces. Raise "
        "MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE (default 1000), MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS "
        "(default 10) and MLFLOW_TRACE_BUFFER_MAX_SIZE (default 1000), give the server more "
        "workers on PostgreSQL, or lower sample_ratio. See the README's sizing table.",
        exports,
        spans,
        evicted,
    )


def watch_exports() -> None:
    """Install the drop counters once per process; never raises."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        _exporter.install_drop_hooks(
            lambda: _dropped("export"), lambda: _dropped("span"), _failed, lambda: _dropped("evicted")
        )
    except Exception:
        from mlflow_ctx_mw._logonce import log_once

        log_once("drop-hooks", "could not watch MLflow's export queue; drops stay silent")
