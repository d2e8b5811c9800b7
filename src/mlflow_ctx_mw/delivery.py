"""Accepted feedback, delivered to MLflow off the request path.

The endpoint answers 202 once a rating is checked; a single background thread delivers it: it
waits (without holding anything) for the trace to be stored, which the async exporter may do
seconds after the response, checks that the trace is the app's (its experiment, and its user
under the "user" policy), and logs the assessment, or updates the one this user already gave
under this name (a changed thumbs is an update, not a second rating). Bounded: a full queue
refuses new ratings (503), and each rating is retried with backoff until its deadline, so no
client can make it do unbounded work. MLflow failures are counted and logged at most once a
minute; a rating that never finds its trace is counted as dropped.

With the spool on (replay.py), a rating MLflow cannot take now is kept on disk instead: one that
meets a failing server, or whose deadline passes while the server is down or traces wait in the
spool (its own may be among them). The spool replays it after those traces.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mlflow_ctx_mw import _exporter, _mlflow
from mlflow_ctx_mw._logonce import log_once
from mlflow_ctx_mw.mapper import USER_KEY
from mlflow_ctx_mw.replay import SPOOLER

__all__ = ["COUNTS", "DELIVERY", "TRACE_ID", "DeliveryError", "Rating", "deliver_now", "replay_rating"]

logger = logging.getLogger("mlflow_ctx_mw")
QUEUE_SIZE = 1000
FIRST_RETRY = 0.25
MAX_RETRY = 2.0
#: The trace ids MLflow 3 issues for traces in an experiment: nothing else reaches MLflow.
TRACE_ID = re.compile(r"^tr-[0-9a-f]{32}$")


@dataclass(frozen=True)
class Rating:
    """One checked rating: what to log on which trace, as whom, under which conditions."""

    feedback_id: str
    trace_id: str | None
    client_request_id: str | None
    kind: str
    name: str
    value: Any
    rationale: str | None
    metadata: dict[str, Any] | None
    source_id: str
    #: "user" policy: the trace must be this user's.
    trace_user: str | None
    #: The app's experiment: a trace elsewhere is not the app's to rate (None: not known).
    experiment_id: str | None
    deadline_seconds: float


class DeliveryError(Exception):
    """A rating that cannot be delivered: "missing" (no such trace by its deadline), "ambiguous"
    (several traces have its client request id), "refused" (not the app's or not the user's),
    "unavailable" (MLflow failed throughout)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Counts:
    accepted: int = 0
    delivered: int = 0
    updated: int = 0
    refused: int = 0
    dropped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


COUNTS = _Counts()


def _attempt(rating: Rating) -> tuple[str, str]:
    """One try: (assessment id, trace id). Raises DeliveryError("missing") to be retried."""
    trace = _find(rating)
    info = trace.info
    if rating.experiment_id is not None and str(info.experiment_id) != rating.experiment_id:
        raise DeliveryError("refused")
    if rating.trace_user is not None and info.trace_metadata.get(USER_KEY) != rating.trace_user:
        raise DeliveryError("refused")
    existing = _mlflow.own_assessment(info, rating.name, rating.source_id)
    assessment_id = _mlflow.write_assessment(
        info.trace_id,
        existing,
        kind=rating.kind,
        name=rating.name,
        value=rating.value,
        source_id=rating.source_id,
        rationale=rating.rationale,
        metadata=rating.metadata,
    )
    COUNTS.add("delivered")
    if existing:
        COUNTS.add("updated")
    return assessment_id, str(info.trace_id)


def _find(rating: Rating) -> Any:
    if rating.trace_id is not None:
        trace = _mlflow.stored_trace(rating.trace_id)
    else:
        found = _mlflow.traces_by_client_request_id(
            rating.client_request_id or "", rating.experiment_id, user=rating.trace_user
        )
        if len(found) > 1:
            raise DeliveryError("ambiguous")
        trace = _mlflow.stored_trace(found[0]) if found else None
    if trace is None:
        raise DeliveryError("missing")
    return trace


def deliver_now(rating: Rating) -> tuple[str, str]:
    """Deliver in the caller's thread, retrying a missing trace until the deadline."""
    deadline = time.monotonic() + rating.deadline_seconds
    delay, failed = FIRST_RETRY, False
    while True:
        try:
            return _attempt(rating)
        except DeliveryError as exc:
            if exc.reason != "missing":
                raise
        except Exception:
            log_once("feedback-delivery", "MLflow failed to store feedback; retrying until its deadline")
            failed = True
        if time.monotonic() + delay > deadline:
            raise DeliveryError("unavailable" if failed else "missing")
        time.sleep(delay)
        delay = min(delay * 2, MAX_RETRY)


class _Delivery:
    """The background queue: ratings ordered by when they are next due, one worker thread."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        self._size = size
        #: (due, order, rating, deadline, next delay), soonest first
        self._due: list[tuple[float, int, Rating, float, float]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, rating: Rating) -> bool:
        """Queue a rating; False when the queue is full (the caller answers 503)."""
        now = time.monotonic()
        with self._wake:
            if len(self._due) >= self._size:
                return False
            deadline = now + rating.deadline_seconds
            heapq.heappush(self._due, (now, next(self._order), rating, deadline, FIRST_RETRY))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mlflow-ctx-feedback", daemon=True)
                self._thread.start()
            self._wake.notify()
        COUNTS.add("accepted")
        return True

    def pending(self) -> int:
        with self._wake:
            return len(self._due)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, rating, deadline, delay = heapq.heappop(self._due)
            self._deliver(rating, deadline, delay)

    def _deliver(self, rating: Rating, deadline: float, delay: float) -> None:
        try:
            _attempt(rating)
            return
        except DeliveryError as exc:
            if exc.reason != "missing":
                COUNTS.add("refused")
                logger.debug("feedback %s refused: %s", rating.feedback_id, exc.reason)
                return
        except Exception as exc:
            log_once("feedback-delivery", "MLflow failed to store feedback; retrying until its deadline")
            if SPOOLER.active and _exporter.is_transient(exc) and SPOOLER.spool_rating(rating):
                SPOOLER.failed()
                return
        now = time.monotonic()
        if now + delay > deadline:
            if SPOOLER.active and (SPOOLER.down or SPOOLER.holds_traces()) and SPOOLER.spool_rating(rating):
                return
            COUNTS.add("dropped")
            logger.debug("feedback %s dropped: its trace was not found in time", rating.feedback_id)
            return
        with self._wake:
            later = (now + delay, next(self._order), rating, deadline, min(delay * 2, MAX_RETRY))
            heapq.heappush(self._due, later)


DELIVERY = _Delivery()


def replay_rating(payload: Any, missing_since: float | None) -> str:
    """One try at a spooled rating: "sent", "missing" (kept: its trace may come yet), "dropped"
    (missing past its deadline), "refused", "down" (kept), or "corrupt"."""
    try:
        rating = Rating(**payload)
        if rating.trace_id is not None and not TRACE_ID.match(rating.trace_id):
            raise ValueError("not a trace id")
    except (TypeError, ValueError):
        return "corrupt"
    try:
        with _exporter.watched():
            _attempt(rating)
    except DeliveryError as exc:
        if exc.reason != "missing":
            COUNTS.add("refused")
            return "refused"
        if missing_since is not None and time.monotonic() - missing_since > rating.deadline_seconds:
            COUNTS.add("dropped")
            return "dropped"
        return "missing"
    except Exception as exc:
        if _exporter.is_transient(exc):
            return "down"
        COUNTS.add("refused")
        return "refused"
    return "sent"
