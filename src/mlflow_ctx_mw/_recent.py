"""Traces this process finished lately: feedback on them need not search or wait blindly.

Feedback often arrives before the async exporter has written the trace. When the trace is one
of ours, a flush exports it now instead of the caller waiting out MLflow's batch interval.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["RECENT", "RecentTraces"]


class RecentTraces:
    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._by_request: OrderedDict[str, str] = OrderedDict()
        self._traces: set[str] = set()
        self._lock = threading.Lock()

    def add(self, trace_id: str, client_request_id: str) -> None:
        by_request, traces = self._by_request, self._traces
        with self._lock:
            if (old := by_request.pop(client_request_id, None)) is not None:
                traces.discard(old)
            by_request[client_request_id] = trace_id
            traces.add(trace_id)
            if len(by_request) > self._size:
                traces.discard(by_request.popitem(last=False)[1])

    def trace_for(self, client_request_id: str) -> str | None:
        return self._by_request.get(client_request_id)

    def __contains__(self, trace_id: object) -> bool:
        return trace_id in self._traces

    def __len__(self) -> int:
        return len(self._by_request)


RECENT = RecentTraces()
