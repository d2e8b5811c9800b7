"""Who made the request: the app's authenticated user first, the X-User-ID header as a fallback.

Built-ins read what the framework's own auth put on the request: Django's `request.user` (place
the middleware after AuthenticationMiddleware), Starlette/FastAPI's `scope["user"]` (from
AuthenticationMiddleware), Flask-Login's `current_user`. Each answers a name, ANONYMOUS ("")
when the app has authentication and nobody is logged in, or None when it sees no authentication
at all: only then may the header name the user by default (`trust_user_header`).
"""

from __future__ import annotations

from typing import Any

from mlflow_ctx_mw.view import RequestView

__all__ = ["ANONYMOUS", "authenticated_user", "flask_login_user", "name_of"]

#: The app authenticates, and this request is not logged in.
ANONYMOUS = ""


def name_of(user: Any) -> str:
    """A stable id for an authenticated user object, or ANONYMOUS."""
    if user is None or not getattr(user, "is_authenticated", False):
        return ANONYMOUS
    for attribute in ("get_username", "get_id", "identity", "display_name", "username", "id", "pk"):
        try:  # Starlette's BaseUser raises NotImplementedError for what a subclass leaves out
            value = getattr(user, attribute, None)
            if callable(value):
                value = value()
        except Exception:
            continue
        if value not in (None, ""):
            return str(value)
    return ANONYMOUS


def authenticated_user(view: RequestView) -> str | None:
    """The framework's authenticated user for this request (see the module docstring)."""
    native = view.native
    if isinstance(native, dict):
        if "type" in native:  # an ASGI scope: Starlette's AuthenticationMiddleware sets "user"
            return name_of(native["user"]) if "user" in native else None
        return flask_login_user()  # a WSGI environ
    if native is not None and hasattr(native, "user"):  # Django's HttpRequest, with auth
        return name_of(native.user)
    return None


def flask_login_user() -> str | None:
    """Flask-Login's current user inside a Flask request context of an app that set it up;
    None elsewhere (no context, or Flask-Login not used)."""
    if _flask_login is None:
        return None
    has_request_context, current_user, current_app = _flask_login
    try:
        if not has_request_context() or getattr(current_app, "login_manager", None) is None:
            return None
        return name_of(current_user._get_current_object())
    except Exception:  # a broken user loader: nobody logged in
        return ANONYMOUS


def _import_flask_login() -> tuple[Any, Any, Any] | None:
    try:
        from flask import current_app, has_request_context
        from flask_login import current_user
    except ImportError:
        return None
    return has_request_context, current_user, current_app


_flask_login = _import_flask_login()  # once: a failed import per request would cost ~10 us
