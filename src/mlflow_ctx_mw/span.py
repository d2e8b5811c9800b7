"""The lifecycle of one request's root span, shared by every adapter.

Adapters open it, run the app inside `with rs:` (span current; an exception ends it as ERROR and
propagates unchanged), set `status_code` as the response starts and call `finish()` when the body
is complete. Every step is fail-open: a failure in MLflow or here is logged once and the request
is served as if untraced.
Request state lives on this per-request object, never on the (shared) middleware.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextvars import ContextVar, Token
from typing import Any, TypeVar

from mlflow_ctx_mw import _mlflow
from mlflow_ctx_mw._logonce import log_once
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.destination import UNRESOLVED, experiment_for_span
from mlflow_ctx_mw.mapper import USER_KEY, RequestContext, RequestView, build_context, redact_fields
from mlflow_ctx_mw.security import redact_query
from mlflow_ctx_mw.users import ANONYMOUS

__all__ = ["RequestSpan", "merge_header_list"]

MAX_NAME_PATH = 200
MAX_URL_PART = 2048  # path and query on the span: enough to debug, bounded against hostile URLs
_T = TypeVar("_T")
_N = TypeVar("_N")
_GONE = (asyncio.CancelledError, GeneratorExit)

#: The request being served in this context (read by current_request() and the log filter).
CURRENT: ContextVar[RequestSpan | None] = ContextVar("mlflow_ctx_mw_request", default=None)
_EXPOSE_NAME = "Access-Control-Expose-Headers"
_EXPOSE = _EXPOSE_NAME.lower()


def _no_route() -> None:
    return None


def merge_header_list(existing: str | None, names: list[str]) -> str:
    """Add `names` to a comma-separated header value, keeping what is there (case-insensitive)."""
    items = [item.strip() for item in (existing or "").split(",") if item.strip()]
    have = {item.lower() for item in items}
    if "*" not in have:
        items.extend(name for name in names if name.lower() not in have)
    return ", ".join(items)


class RequestSpan:
    """One request: its context, its root span (if recording) and the headers to answer with."""

    __slots__ = (
        "_current_token",
        "_done",
        "_method",
        "_path",
        "_query",
        "_root",
        "_sampled_out",
        "_token",
        "complete",
        "context",
        "error",
        "options",
        "resolve_route",
        "route",
        "span",
        "status_code",
        "trace_id",
    )

    def __init__(self, options: Options, context: RequestContext, method: str, path: str) -> None:
        self.options = options
        self.context = context
        self._method = method
        self._path = path
        self._query = ""
        self._root: _mlflow.Root | None = None
        self._token: Any = None
        self._current_token: Token[RequestSpan | None] | None = None
        self._done = False
        self._sampled_out = False
        self.span: _mlflow.LiveSpan | None = None
        self.trace_id: str | None = None
        #: Set by the adapter as the response goes out; read when the span ends.
        self.status_code: int | None = None
        self.route: str | None = None
        #: The whole body went out; False at finish() with a status means the client left early.
        self.complete = False
        #: Adapter-specific: the route template once routing has happened.
        self.resolve_route: Callable[[], str | None] = _no_route
        self.error: BaseException | None = None

    @classmethod
    def open(cls, options: Options, make_view: Callable[[_N], RequestView], native: _N) -> RequestSpan | None:
        """Map the request and start its root span; None if our own code failed on it."""
        try:
            view = make_view(native)
            context = build_context(options, view)
            rs = cls(options, context, view.method, view.path)
        except Exception:
            log_once("map", "mlflow_ctx_mw could not map a request; serving it untraced")
            return None
        experiment_id = experiment_for_span()
        if experiment_id is UNRESOLVED or (
            options.sample_ratio < 1.0 and random.random() >= options.sample_ratio
        ):
            rs._sampled_out = True  # no span; MLflow tracing off while the app runs
            return rs
        try:
            rs._root = _mlflow.start_root_span(
                rs._name(None),
                metadata=context.metadata,
                tags=context.tags,
                client_request_id=context.request_id,
                caller=context.caller,
                experiment_id=experiment_id,
            )
            if rs._root is not None:
                rs.span = rs._root.span
                rs.trace_id = rs.span.trace_id
                rs._query = view.query_string
        except Exception:
            log_once("start", "MLflow could not start a request span; serving untraced")
            rs._root = rs.span = rs.trace_id = None
        return rs

    def attach(self) -> None:
        """Make the root span current so handler code (@mlflow.trace, update_current_trace) joins it."""
        self._current_token = CURRENT.set(self)
        try:
            if self.span is not None:
                self._token = _mlflow.attach(self.span)
            elif self._sampled_out:
                self._token = _mlflow.suppress()
        except Exception:
            log_once("attach", "MLflow could not make the request span current")

    def detach(self) -> None:
        """Undo attach(); must run in the same context that attached."""
        current, self._current_token = self._current_token, None
        if current is not None:
            CURRENT.reset(current)
        token, self._token = self._token, None
        if token is None:
            return
        try:
            if self._sampled_out:
                token()  # suppress() handed back its undo
            else:
                _mlflow.detach(token)
        except Exception:
            log_once("detach", "MLflow could not detach the request span")

    def detach_before_last_send(self) -> None:
        """Detach now if this is the context that attached; else leave it to detach().

        Servers snapshot the context in the last send (uvicorn's keep-alive timer, ~5 s): with
        this request in it, its span and scope outlive the request, filling the GC's young
        generation and adding full collections (the tail latency). Code after the response
        (background tasks) then runs outside the request's span, which has ended by then anyway.
        """
        current = self._current_token
        if current is None:
            return
        try:
            CURRENT.reset(current)  # raises in another context (a streaming task): nothing changes
        except ValueError:
            return
        self._current_token = None
        self.detach()

    def learn_user(self, user: str | None) -> None:
        """What the app's authentication said once it ran (Flask-Login; an auth middleware inside
        ours): its user replaces the header's, and where the app authenticates and nobody is
        logged in, a user only the header claimed is dropped (unless the header is trusted)."""
        context = self.context
        if user is None or user == context.user_id:
            return
        if user == ANONYMOUS:
            if not context.user_from_header or self.options.trust_user_header is True:
                return
            user = None
        context.user_id, context.user_from_header = user, False
        if self.span is not None:
            try:
                _mlflow.set_trace_metadata(self.span, {USER_KEY: user})
            except Exception:
                log_once("user", "MLflow could not record the authenticated user")

    def response_headers(self) -> list[tuple[str, str]]:
        """Headers to add to the response: trace id, feedback token, echoed request id."""
        options = self.options
        headers: list[tuple[str, str]] = []
        if self.trace_id is not None:
            headers.append((options.trace_id_header, self.trace_id))
            if (token := self.feedback_token()) is not None:
                headers.append((options.feedback_token_header, token))
        if options.echo_request_id:
            headers.append((options.request_id_header, self.context.request_id))
        return headers

    def feedback_token(self) -> str | None:
        """The token that lets this response's client rate its trace (token policy)."""
        tokens = self.options.feedback_tokens
        if tokens is None or self.trace_id is None:
            return None
        context = self.context
        return tokens.issue(self.trace_id, context.request_id, context.user_id)

    def apply_headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Response headers with ours set and Access-Control-Expose-Headers merged, not replaced."""
        headers = list(headers)
        ours = self.response_headers()
        names = {name.lower() for name, _ in ours}
        if self.options.expose_headers:
            names.add(_EXPOSE)
        out = [(name, value) for name, value in headers if name.lower() not in names]
        if self.options.expose_headers:
            existing = ", ".join(value for name, value in headers if name.lower() == _EXPOSE)
            if merged := merge_header_list(existing, [name for name, _ in ours]):
                out.append((_EXPOSE_NAME, merged))
        out.extend(ours)
        return out

    def __enter__(self) -> RequestSpan:
        self.attach()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        try:
            if isinstance(error, (StopIteration, StopAsyncIteration)):
                self.complete = True  # a streamed body ran out: everything was sent
            elif error is not None:
                self.finish(error)
        finally:
            self.detach()

    def finish(self, error: BaseException | None = None) -> None:
        """End the span once: ERROR on an exception or a 5xx, named after the route template."""
        if self._done:
            return
        self._done = True
        if self._root is None:
            return
        if isinstance(error, _GONE) and self.status_code is not None:
            error = None  # the client left mid-body and the server cancelled us: not an app error
        try:
            error = error or self.error
            status = self.status_code if self.status_code is not None or error is None else 500
            route = self.route or self.resolve_route()
            options = self.options
            http = {_mlflow.METHOD: self._method, _mlflow.PATH: self._path[:MAX_URL_PART]}
            if self._query:
                http[_mlflow.QUERY] = redact_query(self._query, options.redacted_params)[:MAX_URL_PART]
            if options.redact is not None:
                redact_fields(options, http)
                route = route or http.get(_mlflow.PATH, "")
            _mlflow.end_span(
                self._root,
                name=self._name(route),
                attributes=http,
                status_code=status,
                error=error,
                disconnected=error is None and status is not None and not self.complete,
            )
        except Exception:
            log_once("end", "MLflow could not end a request span")

    def next_chunk(self, chunks: Iterator[_T]) -> _T:
        """next(chunks) with the span current: a streamed body runs after the adapter returned."""
        with self:
            return next(chunks)

    async def anext_chunk(self, chunks: AsyncIterator[_T]) -> _T:
        with self:
            return await chunks.__anext__()

    def _name(self, route: str | None) -> str:
        """METHOD and the route template; the raw path only when no template is known."""
        return f"{self._method} {(route if route is not None else self._path)[:MAX_NAME_PATH]}".rstrip()
