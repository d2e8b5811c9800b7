"""Pure ASGI middleware (FastAPI, Starlette, any ASGI app). Only `http` scopes are traced.

The span opens before the app runs and ends with the last body message, so a streamed response
is covered whole while its `X-Trace-ID` leaves with the headers. Decisions and state live in the
request protocol (span.py); this file translates ASGI messages into its events.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mlflow_ctx_mw import _asgi
from mlflow_ctx_mw._asgi import ASGIApp, Message, Receive, Scope, Send
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.destination import await_ready, startup_wait
from mlflow_ctx_mw.feedback import FeedbackEndpoint, FeedbackRequest
from mlflow_ctx_mw.mapper import resolve_user
from mlflow_ctx_mw.shutdown import flush_pending
from mlflow_ctx_mw.span import Decision, RequestSpan, decide, prepare
from mlflow_ctx_mw.view import RequestView

__all__ = ["MlflowContextMiddleware"]


class MlflowContextMiddleware:
    """`app.add_middleware(MlflowContextMiddleware, **options)` or `MlflowContextMiddleware(app)`."""

    def __init__(self, app: ASGIApp, options: Options | None = None, **kwargs: Any) -> None:
        self.app = app
        self.router = _asgi.router_below(app)  # for route templates on Starlette < 1.8
        self.options = Options.build(options, **kwargs)
        self.feedback = FeedbackEndpoint(self.options)
        prepare(self.options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                _asgi.wrap_error_middleware(scope)
                send = self._lifespan(send)
            await self.app(scope, receive, send)
            return
        decision = decide(self.options, scope.get("path", ""), _asgi.raw_path(scope))
        if decision is Decision.PASS:
            await self.app(scope, receive, send)
            return
        _asgi.wrap_error_middleware(scope)
        view = _asgi.view(scope)
        if decision is Decision.FEEDBACK and await self._feedback(view, receive, send):
            return
        if (wait := startup_wait()) > 0:  # a cold start without lifespan: the first requests wait
            await await_ready(wait)
        rs = RequestSpan.start(self.options, view)
        if rs is None:
            await self.app(scope, receive, send)
            return
        root_path = scope.get("root_path", "")
        rs.resolve_route = lambda: _asgi.route(scope, root_path, self.router)
        learn_user = self.options.user_resolver is None

        async def send_with_context(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                rs.response_started(message["status"], _asgi.scope_user(scope) if learn_user else None)
                message = {**message, "headers": _asgi.add_headers(message.get("headers", ()), rs)}
            last = kind in _asgi.FINAL or (kind == "http.response.body" and not message.get("more_body"))
            if last:
                rs.detach_before_last_send()
            await send(message)
            if last:
                rs.body_done()

        try:
            with rs:
                await self.app(scope, receive, send_with_context)
        except BaseException:
            if rs.status is None and (slot := _asgi.error_headers.get()) is not None:
                slot.extend(_asgi.add_headers((), rs))  # for the 500 an outer middleware builds
            raise
        finally:
            rs.client_gone()  # the app returned without completing the body (client gone, broken app)

    async def _feedback(self, view: RequestView, receive: Receive, send: Send) -> bool:
        """The built-in endpoint; False: not ours (a CORS preflight we were not asked to answer)."""
        body: bytes | None = b""
        if view.method == "POST":
            limit = self.options.feedback_max_bytes
            body = await _asgi.read_body(receive, limit, view.headers.get("content-length"))
        user = resolve_user(self.options, view)
        answer = self.feedback.answer(FeedbackRequest(view.method, view.headers, body, view.client, user))
        if answer is None:
            return False
        status, headers, payload = answer
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if status != 204:
            raw.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})
        return True

    def _lifespan(self, send: Send) -> Send:
        """Lifespan messages pass unchanged: before the server hears "startup complete" the
        destination is settled (bounded), before "shutdown complete" the traces are sent."""
        loop = asyncio.get_running_loop()
        flush = self.options.shutdown_flush_seconds

        async def send_lifespan(message: Message) -> None:
            kind = message.get("type")
            if kind == "lifespan.startup.complete" and (wait := startup_wait()) > 0:
                await await_ready(wait)
            elif kind == "lifespan.shutdown.complete" and flush > 0:
                await loop.run_in_executor(None, flush_pending, flush)
            await send(message)

        return send_lifespan
