"""Nothing lost while the tracking server is down or behind: the spool's policy and its worker.

While MLflow takes traces, nothing changes on any path: the hooks (_exporter.py) only note which
traces are in flight in MLflow's export workers. A trace goes to disk (spool.py) when
- its export failed after one brief retry (server unreachable, 5xx, timeout): then the server
  is *down*: traces are spooled as MLflow's workers pick them up (no HTTP call), its queue and
  its workers' traces in flight are moved to disk, and a feedback rating is spooled on arrival;
- MLflow's queue is full (the server is behind): the trace is handed to this worker, which
  writes it, instead of being dropped;
- its experiment could not be resolved yet (the process started during an outage): it is
  spooled whole and given its experiment when it is replayed.

One thread per process replays: oldest first, traces before ratings (a rating needs its trace),
at most `spool_replay_per_second`, and only while MLflow's own queue is less than half full, so a
recovering server is not flattened. The replay of the oldest entry is also the probe: while
the server is down it is tried with backoff (1 s doubling to 30 s), and its success ends the
outage. Of all the processes on one spool only the holder of its lock replays, so an entry is
sent by one process at a time; a process that died (SIGKILL, OOM) releases the lock with its
life, and the next one to start picks its entries up. An entry is removed only after the server
has taken it: a crash between the two sends it again, which the server stores once (one trace
per trace id, one span per span id).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from mlflow_ctx_mw import _exporter
from mlflow_ctx_mw._logonce import log_once
from mlflow_ctx_mw.spool import Entry, SpoolFiles

__all__ = ["PLACEHOLDER", "SPOOLER", "default_directory"]

logger = logging.getLogger("mlflow_ctx_mw")
#: The experiment id a trace starts with while its experiment is not resolved (it is spooled).
PLACEHOLDER = "mlflow-ctx-mw-unresolved"
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
#: How often the worker rereads the directory (other processes' entries, bounds).
SCAN_SECONDS = 5.0
#: Traces the full-queue path may hand over before the worker has written them (in memory: a
#: burst past MLflow's own queue); past it they are dropped and counted, as before the spool.
#: 1,000 added ~30 MB under an in-process flood (tests/test_memory.py); 200 is ~3 MB.
HANDOFF_LIMIT = 200
#: An entry that failed this often is tried only when nothing else is left (the probe), and is
#: dropped (rejected) once another entry gets through: it, not the server, is the problem.
SUSPECT_AFTER = 5
#: Failed exports in a row before the server is taken for down (one 5xx from a busy server is
#: not an outage: that trace alone is spooled).
DOWN_AFTER = 3
#: Entries of each kind one replay round takes (the oldest); the next round follows at once.
REPLAY_BATCH = 100
EXPERIMENT_KEY = "mlflow.experimentId"


def default_directory() -> Path:
    """$MLFLOW_CTX_SPOOL_DIR, else the user's state directory (it must outlive a redeploy)."""
    configured = os.environ.get("MLFLOW_CTX_SPOOL_DIR")
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "mlflow-ctx-mw" / "spool"


def _subdirectory(tracking_uri: str) -> str:
    """One spool per tracking server and experiment name: entries never reach another one."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
    return hashlib.sha256(f"{tracking_uri}\n{name}".encode()).hexdigest()[:16]


class _Spooler:
    def __init__(self) -> None:
        self.files: SpoolFiles | None = None
        #: The server is known to be down: export straight to the spool.
        self.down = False
        self.rate = 20.0
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF
        self._wake = threading.Condition()
        #: Traces in MLflow's export workers: trace id -> [trace, entry written for it, or None].
        self._flight: dict[str, list[Any]] = {}
        #: Traces some of whose spans MLflow failed to store (an ordered set, bounded).
        self._spans_lost: dict[str, BaseException] = {}
        self._handoff: list[Any] = []
        self._evacuate = False
        self._lock_fd: int | None = None
        self._missing_since: dict[str, float] = {}
        self._failures: dict[Entry, int] = {}  # failed sends in a row
        self._failed_in_a_row = 0
        self.counts = {"replayed": 0, "rejected": 0, "feedback_spooled": 0}

    @property
    def active(self) -> bool:
        return self.files is not None

    # --- set-up ---

    def configure(self, *, directory: str | None, tracking_uri: str, max_bytes: int, max_age: float,
                  rate: float, fsync: bool) -> None:  # fmt: skip
        """Called when a middleware is built; the first configuration wins; never raises."""
        if self.files is not None or not tracking_uri.startswith(("http://", "https://")):
            return  # a local store (sqlite, files) or Databricks: nothing to wait for / not ours
        root = Path(directory) if directory else default_directory()
        directory_ = root / _subdirectory(tracking_uri)
        files = SpoolFiles(directory_, max_bytes=max_bytes, max_age=max_age, fsync=fsync)
        if not files.open():
            return
        self.rate = rate
        self.files = files
        _exporter.install_spool_hooks(self)
        threading.Thread(target=self._run, name="mlflow-ctx-spool", daemon=True).start()

    # --- the exporter's hooks (MLflow's worker threads; the request thread for overflow) ---

    def divert(self, trace: Any) -> bool:
        unresolved = trace.info.experiment_id == PLACEHOLDER
        if not (self.down or unresolved):
            return False
        return self._spool_trace(trace) is not None or unresolved  # never export to the placeholder

    def skip_spans(self, experiment_id: str) -> bool:
        return self.down or experiment_id == PLACEHOLDER

    def begin(self, trace: Any) -> None:
        with self._wake:
            self._flight[trace.info.trace_id] = [trace, None]

    def spans_failed(self, trace_ids: set[str], failure: BaseException) -> None:
        if not _exporter.is_transient(failure):
            return
        failure = failure.with_traceback(None)  # kept a while: not with the frames it went through
        with self._wake:
            for trace_id in trace_ids:
                self._spans_lost[trace_id] = failure
            while len(self._spans_lost) > HANDOFF_LIMIT:
                del self._spans_lost[next(iter(self._spans_lost))]

    def end(self, trace: Any, failure: BaseException | None) -> None:
        with self._wake:
            _, written = self._flight.pop(trace.info.trace_id, (None, None))
            # Its info stored but not all its spans: never whole, never found. Sent again whole.
            failure = failure or self._spans_lost.pop(trace.info.trace_id, None)
        if failure is not None and _exporter.is_transient(failure):
            if written is None:
                self._spool_trace(trace)
            self.failed()
            return
        self._failed_in_a_row = 0
        if written is not None and self.files is not None:  # delivered after all
            self.files.remove(Entry("traces", written, 0.0, trace.info.trace_id))

    def overflow(self, trace: Any) -> bool:
        with self._wake:
            if len(self._handoff) >= HANDOFF_LIMIT:
                return False
            self._handoff.append(trace)
            self._wake.notify()
        return True

    # --- state ---

    def failed(self) -> None:
        """A transient failure; DOWN_AFTER of them in a row make an outage."""
        with self._wake:
            self._failed_in_a_row += 1
            down = self._failed_in_a_row >= DOWN_AFTER
        if down:
            self.went_down()

    def went_down(self) -> None:
        """An export failed: spool from now on, move what MLflow holds to disk, probe later."""
        with self._wake:
            if self.down:
                return
            self.down = True
            self._retry_at = time.monotonic() + self._backoff
            self._evacuate = True
            self._wake.notify()
        log_once("spool-down", f"the MLflow tracking server is not answering: traces are spooled to "
                 f"{self.files.directory if self.files else '?'} and sent when it is back "
                 "(export_stats() counts them)", exc_info=False)  # fmt: skip

    def _came_back(self) -> None:
        if self.down:
            logger.info("the MLflow tracking server answers again: replaying the spool")
            _exporter.retry_span_logging()
        self.down = False
        self._backoff = FIRST_BACKOFF

    def _still_down(self) -> None:
        self.down = True
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        self._retry_at = time.monotonic() + self._backoff

    def holds_traces(self) -> bool:
        return self.files is not None and bool(self.files.list("traces", 1))

    # --- writing ---

    def _spool_trace(self, trace: Any) -> str | None:
        files = self.files
        if files is None:
            return None
        try:
            data = trace.to_dict()
        except Exception:
            log_once("spool-serialise", "could not serialise a trace for the spool; it is dropped")
            return None
        payload: dict[str, Any] = {"trace": data}
        if trace.info.experiment_id == PLACEHOLDER:
            payload["experiment_name"] = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        name = files.write("traces", trace.info.trace_id, payload)
        if files.over_bound():
            with self._wake:
                self._wake.notify()
        return name

    def spool_rating(self, rating: Any) -> str | None:
        """Keep a rating until its trace can be found; its entry's name, or None."""
        import dataclasses

        if self.files is None:
            return None
        name = self.files.write("feedback", rating.feedback_id, {"rating": dataclasses.asdict(rating)})
        if name is not None:
            with self._wake:
                self.counts["feedback_spooled"] += 1
        return name

    def evacuate(self) -> None:
        """Move what MLflow holds in memory to the spool: its queue, and the traces its workers
        are still sending (an entry for one that then arrives is removed). At shutdown while
        the server is down, or past the flush timeout."""
        if self.files is None:
            return
        with self._wake:
            handoff, self._handoff = self._handoff, []
        for trace in [*handoff, *_exporter.drain_queue()]:
            self._spool_trace(trace)
        with self._wake:
            flying = [(trace_id, pair[0]) for trace_id, pair in self._flight.items() if pair[1] is None]
        for trace_id, trace in flying:
            name = self._spool_trace(trace)
            with self._wake:
                pair = self._flight.get(trace_id)
                if pair is not None:
                    pair[1] = name
                elif name is not None:  # delivered while being written
                    self.files.remove(Entry("traces", name, 0.0, trace_id))

    # --- the worker ---

    def _run(self) -> None:
        last_scan, more = 0.0, False
        while True:
            try:
                with self._wake:
                    self._wake.wait(0.0 if more else self._sleep())
                    handoff, self._handoff = self._handoff, []
                    evacuate, self._evacuate = self._evacuate, False
                for trace in handoff:
                    self._spool_trace(trace)
                if evacuate:
                    self.evacuate()
                assert self.files is not None
                if time.monotonic() - last_scan > SCAN_SECONDS or self.files.over_bound():
                    self.files.scan()
                    last_scan = time.monotonic()
                more = (not self.down or time.monotonic() >= self._retry_at) and self._replay()
            except Exception:
                log_once("spool-worker", "the spool's worker failed; retrying")
                time.sleep(1.0)

    def _sleep(self) -> float:
        if self.down:
            return min(SCAN_SECONDS, max(0.05, self._retry_at - time.monotonic()))
        return SCAN_SECONDS

    def _replay(self) -> bool:
        """Send what the spool holds while the server takes it, traces first, a batch at a time;
        True if a whole batch went (more may wait)."""
        files = self.files
        assert files is not None
        listed = files.list("traces", REPLAY_BATCH)
        traces = [entry for entry in listed if entry.key not in self._flight]
        # A rating waits, its clock not running, while a batch of traces is still ahead of it: its
        # trace may be among them (a long spool takes longer to send than a rating may wait).
        ratings = files.list("feedback", REPLAY_BATCH) if len(listed) < REPLAY_BATCH else []
        if not traces and not ratings:
            if self.down:  # nothing to probe with: let MLflow's own path try again
                self._came_back()
            return False
        if not self._lock():  # another process sends, so the server answers: export directly again
            if self.down:
                self._came_back()
            return False
        try:
            entries = [*traces, *ratings]
            names = {entry.name for entry in entries}  # forget what another process sent
            self._failures = {e: n for e, n in self._failures.items() if e.name in names}
            self._missing_since = {n: t for n, t in self._missing_since.items() if n in names}
            fresh = [entry for entry in entries if self._failures.get(entry, 0) < SUSPECT_AFTER]
            for entry in fresh or entries[:1]:
                if not self._send(entry, self._send_trace if entry.kind == "traces" else self._send_rating):
                    return False
        finally:
            self._unlock()
        return REPLAY_BATCH in (len(listed), len(ratings))

    def _send(self, entry: Entry, send: Any) -> bool:
        """One entry, paced; False to stop this round (down, or MLflow's queue is backed up)."""
        if _exporter.backlog() > 0.5:
            return False
        began = time.monotonic()
        outcome = send(entry)
        logger.debug("spool: %s/%s %s", entry.kind, entry.name, outcome)
        if outcome == "down":
            self._failures[entry] = self._failures.get(entry, 0) + 1
            self._still_down()
            return False
        self._failures.pop(entry, None)
        if outcome != "gone":  # the server answered (a corrupt or vanished entry says nothing)
            self._came_back()
            self._reject_suspects()
        if outcome != "gone":  # one send per 1/rate s; new handoffs are written in the next round
            with self._wake:
                self._wake.wait(max(0.0, began + 1.0 / self.rate - time.monotonic()))
        return True

    def _reject_suspects(self) -> None:
        """The server took an entry: those that kept failing meanwhile never will."""
        assert self.files is not None
        for entry in [entry for entry, count in self._failures.items() if count >= SUSPECT_AFTER]:
            del self._failures[entry]
            self.files.remove(entry)
            with self._wake:
                self.counts["rejected"] += 1
            log_once("spool-suspect", f"dropped a spool entry the server failed {SUSPECT_AFTER} times while "
                     "it took others (export_stats().rejected_entries)", exc_info=False)  # fmt: skip

    def _send_trace(self, entry: Entry) -> str:
        assert self.files is not None
        payload = self.files.read(entry)
        if payload is None:
            return "gone"
        data = payload.get("trace")
        try:
            if payload.get("experiment_name") is not None or _experiment_of(data) == PLACEHOLDER:
                from mlflow_ctx_mw.destination import resolve_now

                experiment = resolve_now()
                if experiment is None:
                    return "down"
                _set_experiment(data, experiment)
            trace = _exporter.parse_trace(data)
        except Exception:
            self.files.corrupt(entry)
            return "gone"
        failure = _exporter.deliver_trace(trace)
        if failure is not None and _exporter.is_transient(failure):
            return "down"
        self.files.remove(entry)
        with self._wake:
            self.counts["replayed" if failure is None else "rejected"] += 1
        if failure is not None:
            log_once("spool-rejected", f"the tracking server refused a spooled trace ({failure}); "
                     "it is dropped (export_stats().rejected_entries)", exc_info=False)  # fmt: skip
        return "sent"

    def _send_rating(self, entry: Entry) -> str:
        from mlflow_ctx_mw.delivery import replay_rating

        assert self.files is not None
        payload = self.files.read(entry)
        if payload is None:
            return "gone"
        outcome = replay_rating(payload.get("rating"), self._missing_since.get(entry.name))
        if outcome == "corrupt":
            self.files.corrupt(entry)
            return "gone"
        if outcome == "missing":  # its trace may be on its way still: kept, until its deadline
            self._missing_since.setdefault(entry.name, time.monotonic())
            return "kept"
        if outcome != "down":
            self._missing_since.pop(entry.name, None)
            self.files.remove(entry)
        return outcome

    def _lock(self) -> bool:
        """The spool's replay lock (one process sends at a time); released by death too."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): every process replays; the server dedups
            return True
        assert self.files is not None
        try:
            fd = os.open(self.files.directory / "replay.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing releases the flock


def _experiment_of(data: Any) -> Any:
    return data["info"]["trace_location"]["mlflow_experiment"]["experiment_id"]


def _set_experiment(data: Any, experiment_id: str) -> None:
    """Give a trace spooled before its experiment was resolved the experiment, everywhere
    MLflow recorded the placeholder (the trace's location, its spans' attribute)."""
    import json

    data["info"]["trace_location"]["mlflow_experiment"]["experiment_id"] = experiment_id
    placeholder = json.dumps(PLACEHOLDER)
    for span in data["data"]["spans"]:
        attributes = span.get("attributes") or {}
        if attributes.get(EXPERIMENT_KEY) == placeholder:
            attributes[EXPERIMENT_KEY] = json.dumps(experiment_id)


SPOOLER = _Spooler()
