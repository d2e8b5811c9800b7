"""Pure ASGI middleware (FastAPI, Starlette, any ASGI app). Only `http` scopes are traced.

The span opens before the app runs and ends with the last body message, so a streamed response
is covered whole while its `X-Trace-ID` leaves with the headers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.destination import configure_destination, flush_pending
from mlflow_ctx_mw.feedback import FeedbackEndpoint, FeedbackRequest, is_endpoint
from mlflow_ctx_mw.mapper import RequestView, resolve_user
from mlflow_ctx_mw.span import RequestSpan
from mlflow_ctx_mw.users import name_of

__all__ = ["MlflowContextMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_FINAL = frozenset({"http.response.pathsend", "http.response.zerocopysend"})
_EXPOSE = b"access-control-expose-headers"

# Headers for a 500 that an outer error middleware builds after the exception left us.
_error_headers: ContextVar[list[tuple[bytes, bytes]] | None] = ContextVar(
    "mlflow_ctx_mw_error_headers", default=None
)


class MlflowContextMiddleware:
    """`app.add_middleware(MlflowContextMiddleware, **options)` or `MlflowContextMiddleware(app)`."""

    def __init__(self, app: ASGIApp, options: Options | None = None, **kwargs: Any) -> None:
        self.app = app
        self.options = Options.build(options, **kwargs)
        self.feedback = FeedbackEndpoint(self.options)
        configure_destination(self.options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                _wrap_error_middleware(scope)
                send = self._flush_at_shutdown(send)
            await self.app(scope, receive, send)
            return
        if self.options.excluded(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        _wrap_error_middleware(scope)
        if _is_feedback(self.options, scope) and await self._feedback(scope, receive, send):
            return
        rs = RequestSpan.open(self.options, _view, scope)
        if rs is None:
            await self.app(scope, receive, send)
            return
        root_path = scope.get("root_path", "")
        rs.resolve_route = lambda: _route(scope, root_path)

        async def send_with_context(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                rs.status_code = message["status"]
                if "user" in scope and rs.options.user_resolver is None:  # auth inside ours ran
                    rs.learn_user(name_of(scope["user"]))
                message = {**message, "headers": _add_headers(message.get("headers", ()), rs)}
            last = kind in _FINAL or (kind == "http.response.body" and not message.get("more_body"))
            if last:
                rs.detach_before_last_send()
            await send(message)
            if last:
                rs.complete = True
                rs.finish()

        try:
            with rs:
                await self.app(scope, receive, send_with_context)
        except BaseException:
            if rs.status_code is None and (slot := _error_headers.get()) is not None:
                slot.extend(_add_headers((), rs))
            raise
        finally:
            rs.finish()  # the app returned without completing the body (client gone, broken app)

    def _flush_at_shutdown(self, send: Send) -> Send:
        """Messages pass unchanged; before the server hears "shutdown complete", traces are sent."""
        timeout = self.options.shutdown_flush_seconds

        async def send_after_flush(message: Message) -> None:
            if message.get("type") == "lifespan.shutdown.complete" and timeout > 0:
                await asyncio.get_running_loop().run_in_executor(None, flush_pending, timeout)
            await send(message)

        return send_after_flush

    async def _feedback(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """The built-in endpoint (no MLflow call: the rating is delivered in the background).
        False: not ours to answer (a CORS preflight the app has not asked us to answer)."""
        options = self.options
        view = _view(scope)
        body: bytes | None = b""
        if view.method == "POST":
            body = await _read_body(receive, options.feedback_max_bytes, view.headers.get("content-length"))
        request = FeedbackRequest(view.method, view.headers, body, view.client, resolve_user(options, view))
        answer = self.feedback.answer(request)
        if answer is None:
            return False
        status, headers, payload = answer
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if status != 204:
            raw.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})
        return True


def _is_feedback(options: Options, scope: Scope) -> bool:
    """The endpoint's path, exactly as the client sent it (not %2F-encoded, no doubled slash)."""
    target = options.feedback_path
    if target is None:
        return False
    path = scope.get("path", "")
    if path != target and path != scope.get("root_path", "") + target:
        return False
    raw = scope.get("raw_path")
    return is_endpoint(raw.decode("latin-1") if isinstance(raw, bytes) else None, path)


async def _read_body(receive: Receive, limit: int, content_length: str | None) -> bytes | None:
    """The request body, or None as soon as it is over `limit` (declared or read)."""
    try:
        if content_length is not None and int(content_length) > limit:
            return None
    except ValueError:
        pass
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _view(scope: Scope) -> RequestView:
    raw = scope.get("headers", ())
    if not isinstance(raw, list):
        raw = list(raw)
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}
    if len(headers) < len(raw):  # a repeated name: its values are joined, as HTTP says
        headers = {}
        for raw_name, raw_value in raw:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    client = scope.get("client")
    return RequestView(
        method=scope.get("method", "GET"),
        path=scope.get("path", ""),
        query_string=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
        native=scope,
        client=client[0] if client else None,
    )


def _route(scope: Scope, root_path: str) -> str | None:
    """The matched route template: FastAPI and Starlette >= 1.8 write the route into the shared
    scope; older Starlette only its endpoint, so its router is asked again (once, at the end)."""
    route = scope.get("route")
    if route is None and "endpoint" in scope and (router := scope.get("router")) is not None:
        fresh = {"type": "http", "path": scope.get("path", ""), "root_path": root_path,
                 "method": scope.get("method", "GET")}  # fmt: skip
        return _match(router, fresh)
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    mount = scope.get("root_path", "")[len(root_path) :]
    return f"{mount}{template}"


def _match(router: Any, scope: Scope) -> str | None:
    """The template of the route (through mounts) that fully matches `scope`, as routing did."""
    for route in getattr(router, "routes", ()):
        match, child = route.matches(scope)
        if getattr(match, "name", "") != "FULL":
            continue
        template = getattr(route, "path", None)
        if not isinstance(template, str):
            return None
        if getattr(route, "routes", None):  # a Mount: its own routes hold the rest
            rest = _match(route, {**scope, **child})
            return f"{template}{rest}" if rest else None
        return template
    return None


def _add_headers(headers: Any, rs: RequestSpan) -> list[tuple[bytes, bytes]]:
    """Response headers with ours added; names lower-cased as ASGI asks.

    Usually none of the app's headers is one of ours: then ours are appended as bytes; otherwise
    RequestSpan.apply_headers merges them (a str round trip, ~3x the cost).
    """
    raw = list(headers)
    options = rs.options
    reserved = options.response_header_names
    for name, _ in raw:
        if name.lower() in reserved:
            decoded = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
            return [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in rs.apply_headers(decoded)
            ]
    trace_id = rs.trace_id
    if options.expose_headers and (exposed := options.expose_values[trace_id is not None]):
        raw.append((_EXPOSE, exposed))
    if trace_id is not None:
        raw.append((options.response_header_keys[0], trace_id.encode("latin-1")))
        if (token := rs.feedback_token()) is not None:
            raw.append((options.response_header_keys[2], token.encode("ascii")))
    if options.echo_request_id:
        raw.append((options.response_header_keys[1], rs.context.request_id.encode("latin-1")))
    return raw


def _wrap_error_middleware(scope: Scope) -> None:
    """Inside a Starlette app, put a thin shim around its stack so its 500 carries X-Trace-ID.

    `add_middleware` places us inside ServerErrorMiddleware, which builds the 500 after the
    exception has left us (starlette #1175). The shim adds the headers we leave in a ContextVar.
    """
    app = scope.get("app")
    stack = getattr(app, "middleware_stack", None)
    if stack is None or isinstance(stack, _ErrorResponseHeaders):
        return
    # A read-only or unusual app: its 500 just goes out without our headers.
    with contextlib.suppress(Exception):
        app.middleware_stack = _ErrorResponseHeaders(stack)  # type: ignore[union-attr]


class _ErrorResponseHeaders:
    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot: list[tuple[bytes, bytes]] = []
        token = _error_headers.set(slot)

        async def send_with_headers(message: Message) -> None:
            if slot and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *slot]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _error_headers.reset(token)
