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
from mlflow_ctx_mw.feedback import FeedbackEndpoint, FeedbackRequest, is_endpoint, read_limited
from mlflow_ctx_mw.mapper import RequestView, resolve_user
from mlflow_ctx_mw.span import RequestSpan
from mlflow_ctx_mw.users import flask_login_user

__all__ = ["MlflowContextMiddleware"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class MlflowContextMiddleware:
    def __init__(self, app: WSGIApp, options: Options | None = None, **kwargs: Any) -> None:
        self.app = app
        # Flask's `app.wsgi_app` is a bound method: its app gives Flask-Login's user to the
        # feedback endpoint, and its secret_key can sign feedback tokens.
        flask_app = getattr(app, "__self__", None)
        self._flask = flask_app if hasattr(flask_app, "request_context") else None
        secret = getattr(self._flask, "secret_key", None)
        self.options = Options.build(
            options, default_secret=secret if isinstance(secret, str) else None, **kwargs
        )
        self.feedback = FeedbackEndpoint(self.options)
        configure_destination(self.options)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.options.excluded(environ.get("PATH_INFO", "")):
            return self.app(environ, start_response)
        if _is_feedback(self.options, environ) and (answered := self._feedback(environ, start_response)):
            return answered
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

    def _feedback(self, environ: Environ, start_response: StartResponse) -> list[bytes] | None:
        """The built-in endpoint (no MLflow call: the rating is delivered in the background)."""
        options = self.options
        view = _view(environ)
        body: bytes | None = b""
        if view.method == "POST":
            stream = environ.get("wsgi.input")
            read = stream.read if stream is not None else (lambda n: b"")
            body = read_limited(read, environ.get("CONTENT_LENGTH"), options.feedback_max_bytes)
        answer = self.feedback.answer(
            FeedbackRequest(view.method, view.headers, body, view.client, self._user(view))
        )
        if answer is None:
            return None
        status, headers, payload = answer
        if status != 204:
            headers.append(("Content-Length", str(len(payload))))
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [payload]

    def _user(self, view: RequestView) -> str | None:
        """The requester, as for traces; in a Flask app, inside its request context (Flask-Login)."""
        if self._flask is None or self.options.user_resolver is not None:
            return resolve_user(self.options, view)
        try:
            with self._flask.request_context(view.native):
                return resolve_user(self.options, view)
        except Exception:  # a broken session or user loader: nobody logged in
            return None


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


def _is_feedback(options: Options, environ: Environ) -> bool:
    """The endpoint's path, exactly as the client sent it (not %2F-encoded, no doubled slash)."""
    target = options.feedback_path
    if target is None or environ.get("PATH_INFO") != target:
        return False
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    return is_endpoint(raw, environ.get("SCRIPT_NAME", "") + target)


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
        client=environ.get("REMOTE_ADDR"),
    )


def _route(environ: Environ) -> str | None:
    """Flask/werkzeug's matched rule, when the app parsed a request of this environ."""
    request = environ.get("werkzeug.request")
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    return rule if isinstance(rule, str) else None
