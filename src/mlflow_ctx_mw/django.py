"""Django middleware: add "mlflow_ctx_mw.django.MlflowContextMiddleware" to MIDDLEWARE.

Options come from the optional `settings.MLFLOW_CTX` dict (same keys as everywhere); feedback
tokens are signed with SECRET_KEY unless a secret is named. The middleware is both sync- and
async-capable, so Django never adapts it and async views stay async. Place it after
AuthenticationMiddleware: its user is the trace's user and the feedback's source.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.destination import configure_destination
from mlflow_ctx_mw.feedback import FeedbackEndpoint, FeedbackRequest, is_endpoint, read_limited
from mlflow_ctx_mw.mapper import RequestView, resolve_user
from mlflow_ctx_mw.span import RequestSpan

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
        configure_destination(self.options)
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        if self.options.excluded(request.path_info):
            return self.get_response(request)
        if self._is_feedback(request) and (answered := self._feedback(request)) is not None:
            return answered
        rs = self._open(request)
        if rs is None:
            return self.get_response(request)
        with rs:
            response = self.get_response(request)
        return _respond(rs, request, response)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if self.options.excluded(request.path_info):
            return await self.get_response(request)
        # request.user is lazy and reads the session from the database, which Django forbids in
        # async code (SynchronousOnlyOperation): load it once in a thread, as its auser() does.
        if _lazy_user(request):
            await sync_to_async(_load_user)(request)
        if self._is_feedback(request) and (answered := self._feedback(request)) is not None:
            return answered
        rs = self._open(request)
        if rs is None:
            return await self.get_response(request)
        with rs:
            response = await self.get_response(request)
        return _respond(rs, request, response)

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        """Django turns a view's exception into a 500 before we see it; keep it for the span."""
        setattr(request, _ERROR, exception)

    def _is_feedback(self, request: HttpRequest) -> bool:
        """The endpoint's path, exactly as the client sent it (not %2F-encoded, no doubled slash)."""
        target = self.options.feedback_path
        if target is None or request.path_info != target:
            return False
        raw = request.META.get("RAW_URI") or request.META.get("REQUEST_URI")
        if raw is None and isinstance(scope := getattr(request, "scope", None), dict):  # under ASGI
            raw = scope["raw_path"].decode("latin-1") if isinstance(scope.get("raw_path"), bytes) else None
        return is_endpoint(raw, request.path)

    def _feedback(self, request: HttpRequest) -> HttpResponse | None:
        """The built-in endpoint (no MLflow call: the rating is delivered in the background).
        Django's CSRF check does not run (no view does): the endpoint's own checks stand in."""
        options = self.options
        view = _view(request)
        body: bytes | None = b""
        if request.method == "POST":
            body = read_limited(request.read, request.META.get("CONTENT_LENGTH"), options.feedback_max_bytes)
        answer = self.feedback.answer(
            FeedbackRequest(view.method, view.headers, body, view.client, resolve_user(options, view))
        )
        if answer is None:
            return None
        status, headers, payload = answer
        response = HttpResponse(payload, status=status)
        for name, value in headers:
            response[name] = value
        return response

    def _open(self, request: HttpRequest) -> RequestSpan | None:
        rs = RequestSpan.open(self.options, _view, request)
        if rs is not None:
            rs.resolve_route = lambda: _route(request)  # no reference back: no cycle to collect
        return rs


def _view(request: HttpRequest) -> RequestView:
    return RequestView(
        method=request.method or "GET",
        path=request.path,
        query_string=request.META.get("QUERY_STRING", ""),
        headers=request.headers,
        native=request,
        client=request.META.get("REMOTE_ADDR"),
    )


def _lazy_user(request: HttpRequest) -> bool:
    """request.user set by AuthenticationMiddleware and not loaded yet."""
    user = request.__dict__.get("user")
    return user is not None and getattr(user, "_wrapped", None) is _EMPTY


def _load_user(request: HttpRequest) -> None:
    bool(request.user.is_authenticated)


def _empty() -> object:
    from django.utils.functional import empty

    return empty


_EMPTY = _empty()


def _route(request: HttpRequest) -> str | None:
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None)
    if not route:
        return None
    return route if route.startswith("/") else f"/{route}"


def _respond(rs: RequestSpan, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    rs.error = getattr(request, _ERROR, None)
    for name, value in rs.apply_headers(response.items()):
        response[name] = value
    rs.status_code = response.status_code
    if not response.streaming:
        rs.complete = True
        rs.finish()
        return response
    # The body is consumed after we return: keep the span current while it is produced and end
    # it when the server closes the response (after the last chunk or a client disconnect).
    content = response.streaming_content
    if getattr(response, "is_async", False):
        response.streaming_content = _aiter_attached(rs, content)
    else:
        response.streaming_content = _iter_attached(rs, content)
    response._resource_closers.append(rs.finish)
    return response


def _iter_attached(rs: RequestSpan, content: Iterator[bytes]) -> Iterator[bytes]:
    chunks = iter(content)
    while True:
        try:
            chunk = rs.next_chunk(chunks)
        except StopIteration:
            return
        yield chunk


async def _aiter_attached(rs: RequestSpan, content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    chunks = aiter(content)
    while True:
        try:
            chunk = await rs.anext_chunk(chunks)
        except StopAsyncIteration:
            return
        yield chunk
