"""Who made the request: the app's authenticated user first, the X-User-ID header as a fallback.

Built-ins read what the framework's own auth put on the request: Django's `request.user` (place
the middleware after AuthenticationMiddleware), Starlette/FastAPI's `scope["user"]` (from
AuthenticationMiddleware), Flask-Login's `current_user`. `trust_user_header` says whether the
header may name the user when no authenticated user exists (default: yes, as the seeds do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow_ctx_mw.mapper import RequestView

__all__ = ["authenticated_user", "flask_login_user"]


def _name(user: Any) -> str | None:
    """A stable id for an authenticated user object, or None if it is anonymous."""
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    for attribute in ("get_username", "get_id", "identity", "display_name", "username", "id", "pk"):
        value = getattr(user, attribute, None)
        if callable(value):
            value = value()
        if value not in (None, ""):
            return str(value)
    return None


def authenticated_user(view: RequestView) -> str | None:
    """The framework's authenticated user for this request, if any (never raises on odd objects)."""
    native = view.native
    if isinstance(native, dict):
        if "type" in native:  # an ASGI scope: Starlette's AuthenticationMiddleware sets "user"
            return _name(native.get("user"))
        return flask_login_user()  # a WSGI environ
    return _name(getattr(native, "user", None))  # Django's HttpRequest


def flask_login_user() -> str | None:
    """Flask-Login's current user, inside a Flask request context; None elsewhere."""
    if _flask_login is None:
        return None
    has_request_context, current_user = _flask_login
    try:
        if not has_request_context():
            return None
        return _name(current_user._get_current_object())
    except Exception:  # Flask-Login installed but not set up on this app, or a broken loader
        return None


def _import_flask_login() -> tuple[Any, Any] | None:
    try:
        from flask import has_request_context
        from flask_login import current_user
    except ImportError:
        return None
    return has_request_context, current_user


_flask_login = _import_flask_login()  # once: a failed import per request would cost ~10 us
