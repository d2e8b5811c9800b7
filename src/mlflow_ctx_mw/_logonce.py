"""Failures are logged once per kind, not per request: a down tracking server must not flood logs."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("mlflow_ctx_mw")

_seen: set[str] = set()
_lock = threading.Lock()


def log_once(key: str, message: str, *, exc_info: bool = True, level: int = logging.WARNING) -> None:
    """Log `message` with the current exception the first time `key` is seen in this process."""
    if key in _seen:
        return
    with _lock:
        if key in _seen:
            return
        _seen.add(key)
    logger.log(level, "%s (logged once; further occurrences are silent)", message, exc_info=exc_info)


def reset() -> None:
    """Forget what was logged (tests)."""
    with _lock:
        _seen.clear()
