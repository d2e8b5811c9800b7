"""Django middleware: add "mlflow_ctx_mw.django.MlflowContextMiddleware" to MIDDLEWARE.

Options come from the optional `settings.MLFLOW_CTX` dict (same keys as everywhere); feedback
tokens are signed with SECRET_KEY unless a secret is named. Both sync- and async-capable, so Django
never adapts it and async views stay async. Place it after AuthenticationMiddleware: its user is
the trace's user and the feedback's source (read again as the response starts, if set later).
Decisions and state live in the request protocol (span.py); this file translates Django's calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

from mlflow_ctx_mw import _django
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.destination import await_ready, startup_wait, wait_until_ready
from mlflow_ctx_mw.feedback import FeedbackEndpoint
from mlflow_ctx_mw.span import Decision, RequestSpan, decide, prepare

__all__ = ["MlflowContextMiddleware"]

_ERROR = "_mlflow_ctx_error"


class MlflowContextMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.options = Options.build(
            getattr(settings, "MLFLOW_CTX", None), default_secret=settings.SECRET_KEY
        )
        self.feedback = FeedbackEndpoint(self.options)
        prepare(self.options)
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        decision = decide(self.options, request.path, _django.raw_path(request))
        if decision is Decision.PASS:
            return self.get_response(request)
        if decision is Decision.FEEDBACK and (answer := _django.feedback(self.feedback, request)) is not None:
            return answer
        if (wait := startup_wait()) > 0:  # a cold start: the first requests wait (bounded)
            wait_until_ready(wait)
        if (rs := self._start(request)) is None:
            return self.get_response(request)
        try:
            with rs:
                response = self.get_response(request)
        except BaseException:
            rs.finish()
            raise
        return self._respond(rs, request, response)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        decision = decide(self.options, request.path, _django.raw_path(request))
        if decision is Decision.PASS:
            return await self.get_response(request)
        # request.user is lazy and reads the session from the database, which Django forbids in
        # async code (SynchronousOnlyOperation): load it in a thread, as its auser() does.
        if _django.lazy_user(request):
            await sync_to_async(_django.load_user)(request)
        if decision is Decision.FEEDBACK and (answer := _django.feedback(self.feedback, request)) is not None:
            return answer
        if (wait := startup_wait()) > 0:
            await await_ready(wait)
        if (rs := self._start(request)) is None:
            return await self.get_response(request)
        try:
            with rs:
                response = await self.get_response(request)
        except BaseException:
            rs.finish()
            raise
        if _django.lazy_user(request):  # set by an authentication middleware after ours
            await sync_to_async(_django.load_user)(request)
        return self._respond(rs, request, response)

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        """Django turns a view's exception into a 500 before we see it; keep it for the span."""
        setattr(request, _ERROR, exception)

    def _start(self, request: HttpRequest) -> RequestSpan | None:
        rs = RequestSpan.start(self.options, _django.view(request))
        if rs is not None:
            rs.resolve_route = lambda: _django.route(request)  # no reference back: no cycle to collect
        return rs

    def _respond(self, rs: RequestSpan, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if (error := getattr(request, _ERROR, None)) is not None:
            rs.failed(error)
        user = _django.user(request) if self.options.user_resolver is None else None
        rs.response_started(response.status_code, user)
        for name, value in rs.apply_headers(response.items()):
            response[name] = value
        if not response.streaming:
            rs.body_done()
            return response
        # The body is consumed after we return: keep the span current while it is produced and end
        # it when the server closes the response (after the last chunk or a client disconnect).
        _django.stream_with_span(response, rs)
        return response
