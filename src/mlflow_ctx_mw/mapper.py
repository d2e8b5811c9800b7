"""The framework-free core: an HTTP request (headers, environment) -> MLflow trace context.

Header values are client input. Ids are accepted only when they are printable and within MLflow's
own column limits; free-form values are stripped of control characters and capped. Nothing here
raises on bad input: a bad value is dropped (or, for the request id, replaced by a fresh one).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field

from mlflow_ctx_mw._logonce import log_once
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.users import ANONYMOUS, authenticated_user
from mlflow_ctx_mw.view import RequestView

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_METADATA_LENGTH",
    "MAX_TAG_LENGTH",
    "RequestContext",
    "build_context",
    "clean_id",
    "clean_text",
]

#: client_request_id is stored in a 50-character column; session/user ids are metadata (250).
MAX_ID_LENGTH = 50
MAX_METADATA_LENGTH = 250
MAX_TAG_LENGTH = 1000
SESSION_KEY = "mlflow.trace.session"
#: The caller's trace id ("tr-" + its W3C trace id), searchable as metadata.
CALLER_KEY = "mlflow_ctx.caller_trace_id"
USER_KEY = "mlflow.trace.user"

# Printable ASCII without quotes, backticks or backslashes: MLflow's filter strings have no
# escapes, so only such ids can be looked up safely (and every id we record can be looked up).
_ID = re.compile(r"^[\x21\x23-\x26\x28-\x5b\x5d-\x5f\x61-\x7e]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")

logger = logging.getLogger("mlflow_ctx_mw")


@dataclass
class RequestContext:
    """Everything the span needs for one request, decided before the app runs."""

    request_id: str
    request_id_generated: bool
    metadata: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    session_id: str | None = None
    user_id: str | None = None
    #: The caller's (trace id, span id) from a valid `traceparent`, when accepted.
    caller: tuple[str, str] | None = None
    #: The user id came from the user header (no authenticated user was known yet).
    user_from_header: bool = False


def clean_id(value: str | None, limit: int) -> str | None:
    """An id as given, or None when it is empty, too long or not filter-safe printable ASCII."""
    if not value or not isinstance(value, str):
        return None
    value = value.strip()
    if 0 < len(value) <= limit and _ID.match(value):
        return value
    return None


def clean_text(value: str | None, limit: int) -> str | None:
    """Free text without control characters or lone surrogates, cut to `limit`."""
    if not value:
        return None
    value = _CONTROL.sub(" ", value).strip()
    value = value.encode("utf-8", "replace").decode("utf-8")[:limit]
    return value or None


def new_request_id() -> str:
    return uuid.uuid4().hex


def build_context(options: Options, view: RequestView) -> RequestContext:
    headers = view.headers
    request_key, session_key, _ = options.request_keys
    given = clean_id(headers.get(request_key), MAX_ID_LENGTH)
    ctx = RequestContext(
        request_id=given or new_request_id(),
        request_id_generated=given is None,
    )
    metadata = ctx.metadata
    metadata.update(options.env_values)
    metadata.update(options.static_metadata)
    ctx.tags.update(options.static_tags)
    for header, key in options.header_metadata.items():
        if (value := clean_text(headers.get(header), MAX_METADATA_LENGTH)) is not None:
            metadata[key] = value
    for header, key in options.header_tags.items():
        if (value := clean_text(headers.get(header), MAX_TAG_LENGTH)) is not None:
            ctx.tags[key] = value
    if options.request_hook is not None:
        _apply_hook(options, view, ctx)
    ctx.session_id = clean_id(headers.get(session_key), MAX_METADATA_LENGTH)
    ctx.user_id, ctx.user_from_header = resolve_user_and_source(options, view)
    if options.accept_traceparent is not False and options.traceparent_trusted(view.client):
        ctx.caller = parse_traceparent(headers.get("traceparent"))
        if ctx.caller is not None:
            metadata[CALLER_KEY] = f"tr-{ctx.caller[0]}"
    if ctx.session_id is not None:
        metadata[SESSION_KEY] = ctx.session_id
    if ctx.user_id is not None:
        metadata[USER_KEY] = ctx.user_id
    if options.redact is not None:
        redact_fields(options, metadata)
        redact_fields(options, ctx.tags)
    return ctx


def redact_fields(options: Options, fields: dict[str, str]) -> None:
    """The app's redaction hook over recorded fields; a failing hook drops the value (private
    data is better missing than leaked)."""
    redact = options.redact
    assert redact is not None
    for key, value in list(fields.items()):
        try:
            kept = redact(key, value)
        except Exception:
            log_once("redact", "redact hook failed; the field is not recorded")
            kept = None
        if kept is None:
            del fields[key]
        elif kept != value:
            fields[key] = str(kept)


def resolve_user(options: Options, view: RequestView) -> str | None:
    """The configured resolver, else the framework's authenticated user, else the user header
    when trusted: by default (auto) only in an app with no authentication we can see, so that a
    client cannot name itself in an app that knows who it is.

    A resolver's failure is logged once and counts as nobody logged in.
    """
    return resolve_user_and_source(options, view)[0]


def resolve_user_and_source(options: Options, view: RequestView) -> tuple[str | None, bool]:
    """resolve_user(), and whether the id came from the header."""
    user: str | None
    try:
        if options.user_resolver is not None:
            user = options.user_resolver(view) or ANONYMOUS  # a resolver means the app has auth
        else:
            user = authenticated_user(view)
    except Exception:
        log_once("user_resolver", "user_resolver failed; treating the request as not logged in")
        user = ANONYMOUS
    if user:
        return clean_id(str(user), MAX_METADATA_LENGTH), False
    claimed = header_user(options, view, has_auth=user is not None)
    return claimed, claimed is not None


def header_user(options: Options, view: RequestView, *, has_auth: bool) -> str | None:
    """The user header's id, if the app's policy trusts it here."""
    trust = options.trust_user_header
    if trust is False or (trust is None and has_auth):
        return None
    return clean_id(view.headers.get(options.request_keys[2]), MAX_METADATA_LENGTH)


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def parse_traceparent(value: str | None) -> tuple[str, str] | None:
    """(trace id, span id) in hex from a W3C traceparent, or None if absent or invalid."""
    if not value or len(value) > 128:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return match.group(1), match.group(2)


def _apply_hook(options: Options, view: RequestView, ctx: RequestContext) -> None:
    """A user hook may fail or return junk; the request goes on with what is valid."""
    try:
        extra = options.request_hook(view) if options.request_hook else None
        if not extra:
            return
        for section, target, limit in (
            ("metadata", ctx.metadata, MAX_METADATA_LENGTH),
            ("tags", ctx.tags, MAX_TAG_LENGTH),
        ):
            for key, value in (extra.get(section) or {}).items():
                text = clean_text(str(value), limit) if value is not None else None
                if isinstance(key, str) and key and text is not None:
                    target[key[:MAX_METADATA_LENGTH]] = text
    except Exception:
        log_once("request_hook", "request_hook failed; the request goes on without its fields")
