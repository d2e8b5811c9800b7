"""WSGI middleware (Flask, any WSGI app): `app.wsgi_app = MlflowContextMiddleware(app.wsgi_app)`.

The span ends when the server closes the response iterable, so streamed bodies are covered; each
chunk is produced with the span current. Decisions and state live in the request protocol
(span.py); this file translates WSGI calls into its events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from mlflow_ctx_mw import _wsgi
from mlflow_ctx_mw._wsgi import Environ
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.destination import startup_wait, wait_until_ready
from mlflow_ctx_mw.feedback import FeedbackEndpoint, FeedbackRequest, read_limited
from mlflow_ctx_mw.mapper import resolve_user
from mlflow_ctx_mw.span import Decision, RequestSpan, decide, prepare
from mlflow_ctx_mw.users import flask_login_user
from mlflow_ctx_mw.view import RequestView

__all__ = ["MlflowContextMiddleware"]

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
        prepare(self.options)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        decision = decide(self.options, path, environ.get("RAW_URI") or environ.get("REQUEST_URI"))
        if decision is Decision.PASS:
            return self.app(environ, start_response)
        view = _wsgi.view(environ)
        if decision is Decision.FEEDBACK and (answered := self._feedback(view, start_response)):
            return answered
        if (wait := startup_wait()) > 0:  # a cold start: the first requests wait (bounded)
            wait_until_ready(wait)
        rs = RequestSpan.start(self.options, view)
        if rs is None:
            return self.app(environ, start_response)
        learn_user = self.options.user_resolver is None

        def start_response_with_context(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            # Flask clears environ["werkzeug.request"] when its request context pops: read now,
            # and Flask-Login's user, which exists only inside that context.
            rs.route = _wsgi.route(environ)
            code = status.split(" ", 1)[0]
            rs.response_started(
                int(code) if code.isdigit() else None, flask_login_user() if learn_user else None
            )
            return start_response(status, rs.apply_headers(headers), *exc_info)

        rs.resolve_route = lambda: _wsgi.route(environ)
        try:
            with rs:
                body = self.app(environ, start_response_with_context)
        except BaseException:
            rs.finish()
            raise
        if isinstance(body, (list, tuple)) or _wsgi.is_file_wrapper(environ, body):
            rs.body_done()  # already complete, or a file the server may send natively: kept intact
            return body
        return _wsgi.ClosingBody(body, rs)

    def _feedback(self, view: RequestView, start_response: StartResponse) -> list[bytes] | None:
        """The built-in endpoint; None: not ours (a CORS preflight we were not asked to answer)."""
        body: bytes | None = b""
        environ = view.native
        if view.method == "POST" and (stream := environ.get("wsgi.input")) is not None:
            body = read_limited(stream.read, environ.get("CONTENT_LENGTH"), self.options.feedback_max_bytes)
        request = FeedbackRequest(view.method, view.headers, body, view.client, self._user(view))
        if (answer := self.feedback.answer(request)) is None:
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
