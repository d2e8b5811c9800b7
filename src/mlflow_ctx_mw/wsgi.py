"""WSGI middleware (Flask, any WSGI app): `app.wsgi_app = MlflowContextMiddleware(app.wsgi_app)`.

The span ends when the server closes the response iterable, so streamed bodies are covered.
A streamed body is iterated after the app returned, outside our context: each chunk is produced
with the root span re-attached, so @mlflow.trace code inside a generator still nests under it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import Any, cast

from werkzeug.datastructures import EnvironHeaders

from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.destination import configure_destination
from mlflow_ctx_mw.feedback import feedback_response, read_limited
from mlflow_ctx_mw.mapper import RequestView
from mlflow_ctx_mw.span import RequestSpan
from mlflow_ctx_mw.users import flask_login_user

__all__ = ["MlflowContextMiddleware"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class MlflowContextMiddleware:
    def __init__(self, app: WSGIApp, options: Options | None = None, **kwargs: Any) -> None:
        self.app = app
        self.options = Options.build(options, **kwargs)
        configure_destination(self.options)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.options.excluded(environ.get("PATH_INFO", "")):
            return self.app(environ, start_response)
        target = self.options.feedback_path
        if target and environ.get("PATH_INFO") == target and environ.get("REQUEST_METHOD") != "OPTIONS":
            return _feedback(self.options, environ, start_response)
        rs = RequestSpan.open(self.options, _view, environ)
        if rs is None:
            return self.app(environ, start_response)

        def start_response_with_context(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            code = status.split(" ", 1)[0]
            rs.status_code = int(code) if code.isdigit() else None
            # Flask clears environ["werkzeug.request"] when its request context pops: read now,
            # and Flask-Login's user, which exists only inside that context.
            rs.route = _route(environ)
            if self.options.user_resolver is None:
                rs.learn_user(flask_login_user())
            return start_response(status, rs.apply_headers(headers), *exc_info)

        rs.resolve_route = lambda: _route(environ)
        with rs:
            body = self.app(environ, start_response_with_context)
        if isinstance(body, (list, tuple)) or _is_file_wrapper(environ, body):
            # Already complete, or a file the server may send natively: keep it intact.
            rs.complete = True
            rs.finish()
            return body
        return _ClosingBody(body, rs)


class _ClosingBody:
    """Passes the body through chunk by chunk; ends the span on close() (PEP 3333 guarantees it)."""

    __slots__ = ("_body", "_chunks", "_rs")

    def __init__(self, body: Iterable[bytes], rs: RequestSpan) -> None:
        self._body = body
        self._chunks: Iterator[bytes] | None = None
        self._rs = rs

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._chunks is None:
            self._chunks = iter(self._body)
        return self._rs.next_chunk(self._chunks)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._rs.finish()


def _feedback(options: Options, environ: Environ, start_response: StartResponse) -> list[bytes]:
    view = _view(environ)
    body: bytes | None = b""
    if view.method == "POST":
        stream = environ.get("wsgi.input")
        read = stream.read if stream is not None else (lambda n: b"")
        body = read_limited(read, environ.get("CONTENT_LENGTH"), options.feedback_max_bytes)
    status, headers, payload = feedback_response(options, view, body)
    headers.append(("Content-Length", str(len(payload))))
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [payload]


def _is_file_wrapper(environ: Environ, body: object) -> bool:
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(body, wrapper)


def _view(environ: Environ) -> RequestView:
    return RequestView(
        method=environ.get("REQUEST_METHOD", "GET"),
        path=environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
        query_string=environ.get("QUERY_STRING", ""),
        headers=cast("Mapping[str, str]", EnvironHeaders(environ)),  # a case-insensitive lookup
        native=environ,
    )


def _route(environ: Environ) -> str | None:
    """Flask/werkzeug's matched rule, when the app parsed a request of this environ."""
    request = environ.get("werkzeug.request")
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    return rule if isinstance(rule, str) else None
