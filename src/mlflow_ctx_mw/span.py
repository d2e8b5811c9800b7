"""One request's life, the same under every adapter: decide, start, events, finish.

Adapters only translate their framework's calls into this protocol:

1. `decide(options, path, raw_path)`: pass it through (excluded, or already traced by an outer
   layer of ours), answer the feedback endpoint, or trace it. One set of path rules, on the path
   the client sent (mount prefixes included), so a rule means the same thing everywhere.
2. `RequestSpan.start(options, view)`, then `with rs:` around the app (the span current; an
   exception is recorded and propagates unchanged).
3. Events, in the order the server sees them: `response_started(status, user)` (then the
   headers to add: `apply_headers`), `failed(error)`, `body_done()`, `client_gone()`.
4. `finish()`, exactly once whatever happened (later calls do nothing).

Every step is fail-open: a failure in MLflow or here is logged once and the request is served as
if untraced. Request state lives on this per-request object, never on the (shared) middleware.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextvars import ContextVar, Token
from typing import Any, TypeVar

from mlflow_ctx_mw import _mlflow
from mlflow_ctx_mw._logonce import log_once
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.destination import UNRESOLVED, configure_destination, configure_spool, experiment_for_span
from mlflow_ctx_mw.feedback import is_endpoint
from mlflow_ctx_mw.mapper import USER_KEY, RequestContext, build_context, redact_fields
from mlflow_ctx_mw.security import redact_query
from mlflow_ctx_mw.shutdown import IN_FLIGHT, install_shutdown_flush
from mlflow_ctx_mw.users import ANONYMOUS
from mlflow_ctx_mw.view import RequestView

__all__ = ["Decision", "RequestSpan", "decide", "merge_header_list", "prepare"]

MAX_NAME_PATH = 200
MAX_URL_PART = 2048  # path and query on the span: enough to debug, bounded against hostile URLs
_T = TypeVar("_T")
_GONE = (asyncio.CancelledError, GeneratorExit)

#: The request being served in this context (read by current_request() and the log filter).
CURRENT: ContextVar[RequestSpan | None] = ContextVar("mlflow_ctx_mw_request", default=None)
_EXPOSE_NAME = "Access-Control-Expose-Headers"
_EXPOSE = _EXPOSE_NAME.lower()


class Decision(enum.Enum):
    PASS = "pass"  # excluded, or an outer layer of ours traces it: the app as if we were not here
    FEEDBACK = "feedback"  # the built-in feedback endpoint
    TRACE = "trace"


def prepare(options: Options) -> None:
    """What a middleware sets up once when built: where traces go, the spool for when they cannot
    go there yet, the flush at the end."""
    configure_spool(options)
    configure_destination(options)
    install_shutdown_flush(options.shutdown_flush_seconds)


def decide(options: Options, path: str, raw_path: str | None) -> Decision:
    """What to do with a request, from the path the client sent (`raw_path`: the request target
    as received, when the server says; the endpoint answers only its path sent literally)."""
    if CURRENT.get() is not None or options.excluded(path):
        return Decision.PASS
    if path == options.feedback_path and is_endpoint(raw_path, path):
        return Decision.FEEDBACK
    return Decision.TRACE


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
        "_complete",
        "_current_token",
        "_done",
        "_error",
        "_method",
        "_path",
        "_query",
        "_root",
        "_sampled_out",
        "_status",
        "_token",
        "context",
        "options",
        "resolve_route",
        "route",
        "span",
        "trace_id",
    )

    def __init__(self, options: Options, context: RequestContext, view: RequestView) -> None:
        self.options = options
        self.context = context
        self._method = view.method
        self._path = view.path
        self._query = view.query_string
        self._root: _mlflow.Root | None = None
        self._token: Any = None
        self._current_token: Token[RequestSpan | None] | None = None
        self._done = False
        self._sampled_out = False
        self._status: int | None = None
        self._complete = False  # the whole body went out
        self._error: BaseException | None = None
        self.span: _mlflow.LiveSpan | None = None
        self.trace_id: str | None = None
        #: The route template, when the adapter knows it as the response starts (Flask).
        self.route: str | None = None
        #: Adapter-specific: the route template once routing has happened.
        self.resolve_route: Callable[[], str | None] = _no_route

    @classmethod
    def start(cls, options: Options, view: RequestView) -> RequestSpan | None:
        """Map the request and start its root span; None if our own code failed on it."""
        try:
            rs = cls(options, build_context(options, view), view)
        except Exception:
            log_once("map", "mlflow_ctx_mw could not map a request; serving it untraced")
            return None
        experiment_id = experiment_for_span()
        if experiment_id is UNRESOLVED or (
            options.sample_ratio < 1.0 and random.random() >= options.sample_ratio
        ):
            rs._sampled_out = True  # no span; MLflow tracing off while the app runs
            return rs
        context = rs.context
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
                IN_FLIGHT.enter()
        except Exception:
            log_once("start", "MLflow could not start a request span; serving untraced")
            rs._root = rs.span = rs.trace_id = None
        return rs

    # --- the span current while the app runs ---

    def __enter__(self) -> RequestSpan:
        self._current_token = CURRENT.set(self)
        try:
            if self.span is not None:
                self._token = _mlflow.attach(self.span)
            elif self._sampled_out:
                self._token = _mlflow.suppress()
        except Exception:
            log_once("attach", "MLflow could not make the request span current")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        try:
            if error is not None and not isinstance(error, (StopIteration, StopAsyncIteration)):
                self.failed(error)
        finally:
            self._detach()

    def _detach(self) -> None:
        """Undo __enter__; must run in the same context that attached."""
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
        """Detach now if this is the context that attached; else leave it to __exit__.

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
        self._detach()

    @property
    def status(self) -> int | None:
        """The response's status, once it has started."""
        return self._status

    # --- events ---

    def response_started(self, status: int | None, user: str | None = None) -> None:
        """The response's status line is going out. `user`: what the app's authentication said
        once it ran (Flask-Login; an auth middleware inside ours): its user replaces the
        header's, and where the app authenticates and nobody is logged in, a user only the
        header claimed is dropped (unless the header is trusted). None: nothing learnt."""
        self._status = status
        context = self.context
        if user is None or user == context.user_id:
            return
        if user == ANONYMOUS:
            if not context.user_from_header or self.options.trust_user_header is True:
                return
            new: str | None = None
        else:
            new = user
        context.user_id, context.user_from_header = new, False
        if self.span is not None:
            try:
                _mlflow.set_trace_metadata(self.span, {USER_KEY: new})
            except Exception:
                log_once("user", "MLflow could not record the authenticated user")

    def failed(self, error: BaseException) -> None:
        """The app raised (or its framework turned an exception into a 500: Django)."""
        if isinstance(error, _GONE) and self._status is not None:
            return  # the client left mid-body and the server cancelled us: not an app error
        self._error = self._error or error

    def body_done(self) -> None:
        """The last byte of the body went out."""
        self._complete = True
        self.finish()

    def client_gone(self) -> None:
        """The client left before the body was complete."""
        self.finish()

    def finish(self) -> None:
        """End the span once: ERROR on an exception or a 5xx, named after the route template."""
        if self._done:
            return
        self._done = True
        if self._root is None:
            return
        try:
            error = self._error
            status = self._status if self._status is not None or error is None else 500
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
                disconnected=error is None and status is not None and not self._complete,
            )
        except Exception:
            log_once("end", "MLflow could not end a request span")
        finally:
            IN_FLIGHT.leave()

    # --- headers ---

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

    # --- a body produced after the adapter returned (streaming) ---

    def next_chunk(self, chunks: Iterator[_T]) -> _T:
        """next(chunks) with the span current: its end is body_done(), an error ends the body."""
        with self:
            try:
                return next(chunks)
            except BaseException as error:
                self._chunk_ended(error)
                raise

    async def anext_chunk(self, chunks: AsyncIterator[_T]) -> _T:
        with self:
            try:
                return await chunks.__anext__()
            except BaseException as error:
                self._chunk_ended(error)
                raise

    def _chunk_ended(self, error: BaseException) -> None:
        if isinstance(error, (StopIteration, StopAsyncIteration)):
            self.body_done()
        else:
            self.failed(error)
            self.finish()

    def _name(self, route: str | None) -> str:
        """METHOD and the route template; the raw path only when no template is known."""
        return f"{self._method} {(route if route is not None else self._path)[:MAX_NAME_PATH]}".rstrip()
