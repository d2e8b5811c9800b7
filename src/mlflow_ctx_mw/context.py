"""The current request's context for app code: read it, log with it, pass it on.

Works in async and sync code alike (the middleware keeps it in a ContextVar, which threadpools
and asgiref copy), without touching MLflow internals.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from mlflow_ctx_mw import _mlflow
from mlflow_ctx_mw.span import CURRENT

__all__ = ["RequestInfo", "TraceContextFilter", "current_request", "outgoing_headers"]


@dataclass(frozen=True)
class RequestInfo:
    trace_id: str | None  # None when the request is not traced (sampled out, MLflow failed)
    client_request_id: str
    session_id: str | None
    user_id: str | None


def current_request() -> RequestInfo | None:
    """This request's ids, or None outside a request the middleware serves."""
    rs = CURRENT.get()
    if rs is None:
        return None
    ctx = rs.context
    return RequestInfo(rs.trace_id, ctx.request_id, ctx.session_id, ctx.user_id)


def outgoing_headers() -> dict[str, str]:
    """Headers for calls to other services (httpx/requests `headers=`): the next service links
    its trace to this one (`traceparent`) and carries the same request, session and user ids."""
    rs = CURRENT.get()
    if rs is None:
        return {}
    options, ctx = rs.options, rs.context
    headers = {options.request_id_header: ctx.request_id}
    if ctx.session_id:
        headers[options.session_id_header] = ctx.session_id
    if ctx.user_id:
        headers[options.user_id_header] = ctx.user_id
    if rs.span is not None:
        with contextlib.suppress(Exception):  # tracing trouble never breaks the outgoing call
            headers["traceparent"] = _mlflow.traceparent(rs.span)
    return headers


class TraceContextFilter(logging.Filter):
    """Adds trace_id, client_request_id, session_id and user_id to every log record ("-" when
    there is no request), so application logs join with traces. Attach it to a handler:

        handler.addFilter(TraceContextFilter())
        formatter = logging.Formatter("%(levelname)s [%(trace_id)s %(user_id)s] %(message)s")
    """

    def filter(self, record: logging.LogRecord) -> bool:
        info = current_request()
        record.trace_id = (info.trace_id if info else None) or "-"
        record.client_request_id = info.client_request_id if info else "-"
        record.session_id = (info.session_id if info else None) or "-"
        record.user_id = (info.user_id if info else None) or "-"
        return True
