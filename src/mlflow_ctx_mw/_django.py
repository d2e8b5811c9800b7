"""Django plumbing for the middleware in django.py: the request as a RequestView, its route, its
user (lazy, and async-unsafe to load), the feedback endpoint's answer as an HttpResponse, and
streamed bodies produced with the span current."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.functional import empty

from mlflow_ctx_mw.feedback import FeedbackEndpoint, FeedbackRequest, read_limited
from mlflow_ctx_mw.mapper import resolve_user
from mlflow_ctx_mw.span import RequestSpan
from mlflow_ctx_mw.users import name_of
from mlflow_ctx_mw.view import RequestView


def view(request: HttpRequest) -> RequestView:
    return RequestView(
        method=request.method or "GET",
        path=request.path,  # with the script prefix: as the client sent it
        query_string=request.META.get("QUERY_STRING", ""),
        headers=request.headers,
        native=request,
        client=request.META.get("REMOTE_ADDR"),
    )


def raw_path(request: HttpRequest) -> str | None:
    """The request target as received: WSGI servers' RAW_URI / REQUEST_URI, ASGI's raw_path."""
    raw = request.META.get("RAW_URI") or request.META.get("REQUEST_URI")
    if raw is None and isinstance(scope := getattr(request, "scope", None), dict):
        path = scope.get("raw_path")
        raw = path.decode("latin-1") if isinstance(path, bytes) else None
    return str(raw) if raw is not None else None


def route(request: HttpRequest) -> str | None:
    match = getattr(request, "resolver_match", None)
    template = getattr(match, "route", None)
    if not template:
        return None
    return template if template.startswith("/") else f"/{template}"


def lazy_user(request: HttpRequest) -> bool:
    """request.user set by AuthenticationMiddleware and not loaded yet."""
    user = request.__dict__.get("user")
    return user is not None and getattr(user, "_wrapped", None) is empty


def load_user(request: HttpRequest) -> None:
    bool(request.user.is_authenticated)


def user(request: HttpRequest) -> str | None:
    """The authenticated user (name or ANONYMOUS), or None where the app has no authentication."""
    return name_of(request.user) if hasattr(request, "user") else None


def feedback(endpoint: FeedbackEndpoint, request: HttpRequest) -> HttpResponse | None:
    """The built-in endpoint's answer; Django's CSRF check does not run for it (no view does): the
    endpoint's own checks stand in. None: not ours (a CORS preflight we were not asked to answer)."""
    options = endpoint.options
    req = view(request)
    body: bytes | None = b""
    if request.method == "POST":
        body = read_limited(request.read, request.META.get("CONTENT_LENGTH"), options.feedback_max_bytes)
    user = resolve_user(options, req)
    answer = endpoint.answer(FeedbackRequest(req.method, req.headers, body, req.client, user))
    if answer is None:
        return None
    status, headers, payload = answer
    response = HttpResponse(payload, status=status)
    for name, value in headers:
        response[name] = value
    return response


def stream_with_span(response: HttpResponseBase, rs: RequestSpan) -> None:
    """Produce each chunk with the span current; end it when the server closes the response."""
    content: Any = response.streaming_content
    if getattr(response, "is_async", False):
        response.streaming_content = _aiter_attached(rs, content)
    else:
        response.streaming_content = _iter_attached(rs, content)
    response._resource_closers.append(rs.client_gone)


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
