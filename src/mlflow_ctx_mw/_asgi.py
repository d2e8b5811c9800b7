"""ASGI plumbing for the middleware in asgi.py: the scope as a RequestView, the body read within a
limit, route templates from Starlette's router, response headers as bytes, and the shim that puts
our headers on a 500 built by Starlette's ServerErrorMiddleware (outside us)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

from mlflow_ctx_mw.span import RequestSpan
from mlflow_ctx_mw.users import name_of
from mlflow_ctx_mw.view import RequestView

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The last message of a response (besides a body message without more_body).
FINAL = frozenset({"http.response.pathsend", "http.response.zerocopysend"})
_EXPOSE = b"access-control-expose-headers"

# Headers for a 500 that an outer error middleware builds after the exception left us.
error_headers: ContextVar[list[tuple[bytes, bytes]] | None] = ContextVar(
    "mlflow_ctx_mw_error_headers", default=None
)


def raw_path(scope: Scope) -> str | None:
    """The request target's path as received, when the server gives it."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if isinstance(raw, bytes) else None


def scope_user(scope: Scope) -> str | None:
    """Starlette's AuthenticationMiddleware's user, when it ran (inside ours, it ran by now)."""
    return name_of(scope["user"]) if "user" in scope else None


async def read_body(receive: Receive, limit: int, content_length: str | None) -> bytes | None:
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


def view(scope: Scope) -> RequestView:
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


def route(scope: Scope, root_path: str, router: Any = None) -> str | None:
    """The matched route template: FastAPI and Starlette >= 1.8 write the route into the shared
    scope; older Starlette only its endpoint, so the router under us (`router_below`; the scope's
    "router" is the outermost one, above any mount) is asked again, once, at the end."""
    route = scope.get("route")
    if route is None and "endpoint" in scope and (router := router or scope.get("router")) is not None:
        fresh = {"type": "http", "path": scope.get("path", ""), "root_path": root_path,
                 "method": scope.get("method", "GET")}  # fmt: skip
        return _match(router, fresh)
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    mount = scope.get("root_path", "")[len(root_path) :]
    return f"{mount}{template}"


def router_below(app: Any) -> Any:
    """The first router in the chain of apps and middlewares we wrap (Starlette's middlewares keep
    the next one in `.app`, an application its router in `.router`), or None."""
    for _ in range(32):
        if isinstance(getattr(app, "routes", None), list):
            return app
        router = getattr(app, "router", None)
        if isinstance(getattr(router, "routes", None), list):
            return router
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


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


def add_headers(headers: Any, rs: RequestSpan) -> list[tuple[bytes, bytes]]:
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


def wrap_error_middleware(scope: Scope) -> None:
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
        token = error_headers.set(slot)

        async def send_with_headers(message: Message) -> None:
            if slot and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *slot]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            error_headers.reset(token)
