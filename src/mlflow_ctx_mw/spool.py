"""The spool's files: traces and ratings MLflow could not take, kept on disk until it can.

One directory per tracking server (and experiment name), shared by every process of the app:
- `traces/` and `feedback/` hold one JSON file per entry, named `<time_ns>-<id>.json`, so that a
  listing is already oldest first and a trace is never spooled twice under two names;
- a file is written whole under `tmp/` (a name with the writer's pid: no two writers ever share
  a file) and renamed into place, so a reader sees a complete entry or none; a crash mid-write
  leaves only a `tmp/` file, removed later;
- bounded by bytes and by age: past either, the oldest entries go (counted as expired);
- `fsync` (off by default) makes an entry survive a power loss, not only the process's death.

Nothing here raises into the app: a read-only or full disk makes `write` return None (the caller
counts the entry as dropped, as before the spool), a corrupt entry is removed and counted.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_ctx_mw._logonce import log_once

__all__ = ["KINDS", "Entry", "SpoolFiles"]

KINDS = ("traces", "feedback")
FORMAT = 1
#: A `tmp/` file this old is a write that died with its process.
STALE_TMP_SECONDS = 600.0


@dataclass(frozen=True)
class Entry:
    """One spooled file, known from its name alone (a listing reads no file)."""

    kind: str
    name: str
    #: When it was spooled (time.time()).
    created: float
    #: The trace id or feedback id it holds.
    key: str


#: `<time_ns>-<trace or feedback id>.json`: ours; anything else in the directory is left alone.
_NAME = re.compile(r"^(\d{19,20})-([A-Za-z0-9_-]{1,80})\.json$")


class SpoolFiles:
    def __init__(self, directory: Path, *, max_bytes: int, max_age: float, fsync: bool) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.fsync = fsync
        self._lock = threading.Lock()
        #: Bytes on disk at the last scan plus what this process wrote since.
        self.bytes = 0
        self.entries = 0
        self.counts = self.no_counts()

    @staticmethod
    def no_counts() -> dict[str, int]:
        return {"written": 0, "unwritable": 0, "expired": 0, "corrupt": 0}

    def open(self) -> bool:
        """Create the directories (private to the app's user); False if they cannot be written."""
        try:
            for sub in (*KINDS, "tmp"):
                (self.directory / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = self.directory / "tmp" / f"probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            log_once("spool-open", f"the spool directory {self.directory} cannot be written: traces "
                     "MLflow cannot take are dropped, as without a spool", exc_info=False)  # fmt: skip
            return False
        self.scan()
        return True

    def write(self, kind: str, key: str, payload: dict[str, Any]) -> str | None:
        """Spool one entry; its file name, or None (disk full, read-only: counted, said once)."""
        name = f"{time.time_ns():020d}-{key}.json"
        data = json.dumps({"format": FORMAT, "kind": kind, **payload}, separators=(",", ":")).encode()
        tmp = self.directory / "tmp" / f"{name}.{os.getpid()}.{threading.get_ident()}"
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, self.directory / kind / name)
            if self.fsync:
                self._fsync_dir(self.directory / kind)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._count("unwritable")
            log_once("spool-write", f"could not write to the spool {self.directory} (disk full or "
                     "read-only?): what MLflow cannot take now is dropped", exc_info=False)  # fmt: skip
            return None
        with self._lock:
            self.counts["written"] += 1
            self.bytes += len(data)
            self.entries += 1
        return name

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def list(self, kind: str, limit: int | None = None) -> list[Entry]:
        """This kind's entries, oldest first (every process's), at most `limit` of them: a spool
        of 100,000 entries is walked, never held in memory whole. Foreign names are left alone."""
        try:
            with os.scandir(self.directory / kind) as found:
                names = (item.name for item in found if _NAME.match(item.name))
                oldest = sorted(names) if limit is None else heapq.nsmallest(limit, names)
        except OSError:
            return []
        return [self._entry(kind, name) for name in oldest]

    @staticmethod
    def _entry(kind: str, name: str) -> Entry:
        match = _NAME.match(name)
        assert match is not None
        return Entry(kind, name, int(match[1]) / 1e9, match[2])

    def read(self, entry: Entry) -> dict[str, Any] | None:
        """The entry's payload; None if it is gone (another process took it) or corrupt (then
        removed and counted: it must never block the rest)."""
        path = self.directory / entry.kind / entry.name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            raw = b""
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict) or payload.get("format") != FORMAT:
                raise ValueError("not a spool entry")
            if payload.get("kind") != entry.kind:
                raise ValueError("entry of another kind")
        except ValueError:
            self.corrupt(entry)
            return None
        return payload

    def corrupt(self, entry: Entry) -> None:
        self._count("corrupt")
        log_once("spool-corrupt", f"skipped a corrupt spool entry ({entry.kind}/{entry.name}); "
                 "export_stats().corrupt_entries counts them", exc_info=False)  # fmt: skip
        self.remove(entry)

    def remove(self, entry: Entry) -> None:
        with contextlib.suppress(OSError):
            size = (self.directory / entry.kind / entry.name).stat().st_size
            os.unlink(self.directory / entry.kind / entry.name)
            with self._lock:
                self.bytes = max(0, self.bytes - size)
                self.entries = max(0, self.entries - 1)

    def over_bound(self) -> bool:
        return self.bytes > self.max_bytes

    def scan(self) -> None:
        """Recount what is on disk (every process writes here), drop what is past the bounds,
        and clear the `tmp/` files of writes that died. One pass that keeps only sums; a second,
        oldest first, only when a bound is passed."""
        now = time.time()
        total = kept = 0
        oldest = now
        for kind in KINDS:
            with contextlib.suppress(OSError), os.scandir(self.directory / kind) as found:
                for item in found:
                    match = _NAME.match(item.name)
                    with contextlib.suppress(OSError):
                        if match:
                            total += item.stat().st_size
                            kept += 1
                            oldest = min(oldest, int(match[1]) / 1e9)
        if total > self.max_bytes or now - oldest > self.max_age:
            entries = sorted((entry for kind in KINDS for entry in self.list(kind)), key=lambda e: e.name)
            for entry in entries:
                if total <= self.max_bytes and now - entry.created <= self.max_age:
                    break  # oldest first: the rest are younger and fit
                try:
                    size = (self.directory / entry.kind / entry.name).stat().st_size
                except OSError:
                    continue
                self._expire(entry)
                total -= size
                kept -= 1
        with self._lock:
            self.bytes, self.entries = total, kept
        self._clear_stale_tmp(now)

    def _expire(self, entry: Entry) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.directory / entry.kind / entry.name)
            self._count("expired")
            log_once("spool-expired", "the spool is past its bound (spool_max_bytes or "
                     "spool_max_age_seconds): its oldest entries are dropped", exc_info=False)  # fmt: skip

    def _clear_stale_tmp(self, now: float) -> None:
        with contextlib.suppress(OSError), os.scandir(self.directory / "tmp") as found:
            for item in found:
                with contextlib.suppress(OSError):
                    if now - item.stat().st_mtime > STALE_TMP_SECONDS:
                        os.unlink(item.path)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1
