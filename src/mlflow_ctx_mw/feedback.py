"""Feedback on a trace from clients that cannot call MLflow themselves (browsers, mobile apps).

The built-in endpoint (`FeedbackEndpoint.answer`, the same for every adapter) treats every byte as
an attacker's: it checks the request, the body, the ids (the exact form MLflow issues) and the
client's right to rate the trace, without a single MLflow call, then hands the rating to the
background delivery (`delivery.py`) and answers 202. No server worker waits on MLflow, and a
client error is a 4xx that is never logged as an MLflow failure.

`log_feedback(...)` is the synchronous helper for app code with its own route (it waits, in the
caller's thread, for the trace to exist); both validate the same way.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.delivery import COUNTS, DELIVERY, TRACE_ID, DeliveryError, Rating, deliver_now
from mlflow_ctx_mw.destination import app_experiment
from mlflow_ctx_mw.mapper import MAX_ID_LENGTH, MAX_METADATA_LENGTH, clean_id
from mlflow_ctx_mw.replay import SPOOLER
from mlflow_ctx_mw.security import RateLimiter

__all__ = [
    "Feedback",
    "FeedbackEndpoint",
    "FeedbackError",
    "FeedbackRequest",
    "FeedbackResult",
    "is_endpoint",
    "log_feedback",
    "parse_feedback",
    "read_limited",
]

MAX_NAME_LENGTH = 250
MAX_TEXT_VALUE = 10_000
MAX_RATIONALE = 10_000
MAX_ITEMS = 100
#: JSON numbers MLflow stores exactly (a double's integer range).
MAX_INT = 2**53
FIELDS = frozenset({"trace_id", "client_request_id", "value", "name", "rationale", "metadata", "kind"})
_NAME = re.compile(r"^[^\x00-\x1f\x7f]+$")
Scalar = bool | int | float | str
Value = Scalar | list[Scalar] | dict[str, Scalar]


class FeedbackError(Exception):
    """Feedback that cannot be taken; `status` is the HTTP answer, `field` the part at fault."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def payload(self) -> dict[str, str]:
        body = {"error": self.message}
        if self.field:
            body["field"] = self.field
        return body


@dataclass(frozen=True)
class FeedbackResult:
    assessment_id: str
    trace_id: str


@dataclass(frozen=True)
class Feedback:
    """A checked feedback body: exactly one id, and values MLflow stores as given."""

    trace_id: str | None
    client_request_id: str | None
    value: Value
    name: str
    rationale: str | None
    metadata: dict[str, Scalar] | None
    kind: str


def _invalid(field: str, message: str) -> FeedbackError:
    return FeedbackError(422, f"{field}: {message}", field)


def _text(value: object, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _invalid(field, "expected a string")
    if len(value) > limit:
        raise _invalid(field, f"longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800"): not text MLflow can store
        raise _invalid(field, "not valid Unicode text") from None
    return value


def _scalar(value: object, field: str) -> Scalar:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise _invalid(field, "integers must be within +-2**53")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _invalid(field, "numbers must be finite")
        return value
    if isinstance(value, str):
        return _text(value, field, MAX_TEXT_VALUE)
    raise _invalid(field, "expected a boolean, number or string")


def _flat_object(value: object, field: str) -> dict[str, Scalar]:
    if not isinstance(value, dict):
        raise _invalid(field, "expected an object")
    if len(value) > MAX_ITEMS:
        raise _invalid(field, f"at most {MAX_ITEMS} keys")
    out: dict[str, Scalar] = {}
    for key, item in value.items():
        if not key or len(key) > MAX_NAME_LENGTH:
            raise _invalid(field, f"keys must be 1-{MAX_NAME_LENGTH} characters")
        out[_text(key, field, MAX_NAME_LENGTH)] = _scalar(item, field)
    return out


def _value(value: object) -> Value:
    """What MLflow stores as an assessment value: a scalar, or a flat list/object of scalars."""
    if value is None:
        raise _invalid("value", "required")
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise _invalid("value", f"at most {MAX_ITEMS} items")
        return [_scalar(item, "value") for item in value]
    if isinstance(value, dict):
        return _flat_object(value, "value")
    return _scalar(value, "value")


def check_feedback(
    *,
    trace_id: object = None,
    client_request_id: object = None,
    value: object = None,
    name: object = "user_feedback",
    rationale: object = None,
    metadata: object = None,
    kind: object = "feedback",
) -> Feedback:
    """Raise FeedbackError (422) unless every field is of the form MLflow would take as is."""
    if (trace_id is None) == (client_request_id is None):
        raise FeedbackError(422, "give exactly one of trace_id or client_request_id", "trace_id")
    if trace_id is not None and (not isinstance(trace_id, str) or not TRACE_ID.match(trace_id)):
        raise _invalid("trace_id", "not an MLflow trace id (tr- and 32 hexadecimal digits)")
    if client_request_id is not None and (
        not isinstance(client_request_id, str)
        or clean_id(client_request_id, MAX_ID_LENGTH) != client_request_id
    ):  # exactly as recorded: the ids the middleware keeps are filter-safe
        raise _invalid(
            "client_request_id",
            f"1-{MAX_ID_LENGTH} printable characters without spaces, quotes, backticks or backslashes",
        )
    checked_name = _text(name, "name", MAX_NAME_LENGTH)
    if not _NAME.match(checked_name):
        raise _invalid("name", "1 or more characters, no control characters")
    if kind not in ("feedback", "expectation"):
        raise _invalid("kind", "'feedback' or 'expectation'")
    checked_rationale = None if rationale is None else _text(rationale, "rationale", MAX_RATIONALE)
    if kind == "expectation" and checked_rationale:
        raise _invalid("rationale", "expectations take no rationale")
    return Feedback(
        trace_id=trace_id,
        client_request_id=client_request_id,
        value=_value(value),
        name=checked_name,
        rationale=checked_rationale,
        metadata=None if metadata is None else _flat_object(metadata, "metadata"),
        kind=str(kind),
    )


def parse_feedback(body: bytes, max_bytes: int) -> Feedback:
    """A feedback body as the endpoint receives it: 413, 400 or 422 unless it is sound."""
    if len(body) > max_bytes:
        raise FeedbackError(413, f"body larger than {max_bytes} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise FeedbackError(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise FeedbackError(422, "body: expected a JSON object", "body")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise _invalid(str(unknown[0])[:50], f"unknown field; expected {', '.join(sorted(FIELDS))}")
    return check_feedback(**data)


# --- the endpoint --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackRequest:
    """One request to the endpoint, as every adapter sees it."""

    method: str
    #: Lower-case header names.
    headers: Mapping[str, str]
    #: The body, or None when it was larger than the limit (not read further).
    body: bytes | None
    #: The peer's address, for rate limits.
    client: str | None
    #: The requester's user as the app authenticates it (or the trusted header), if any.
    user: str | None


Answer = tuple[int, list[tuple[str, str]], bytes]
_JSON = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


class FeedbackEndpoint:
    """The endpoint's checks and the state they need (tokens, rate limits); one per middleware."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.tokens = options.feedback_tokens
        self.limiter = RateLimiter(options.feedback_rate_limit)

    def answer(self, request: FeedbackRequest) -> Answer | None:
        """Status, headers and JSON body; None: not ours to answer (a CORS preflight the app has
        not asked us to answer goes to the app, as any OPTIONS request would)."""
        cors = self._cors(request)
        if request.method == "OPTIONS":
            return self._preflight(cors) if cors else None
        try:
            status, payload = self._accept(request)
        except FeedbackError as exc:
            status, payload = exc.status, exc.payload()
            retry = getattr(exc, "retry_after", None)
            if retry:
                cors = [*cors, ("Retry-After", str(max(1, math.ceil(retry))))]
        headers = [*_JSON, *cors]
        if status == 405:
            headers.append(("Allow", "POST, OPTIONS" if self.options.feedback_cors_origins else "POST"))
        return status, headers, json.dumps(payload).encode()

    def _accept(self, request: FeedbackRequest) -> tuple[int, dict[str, Any]]:
        options = self.options
        if request.method != "POST":
            raise FeedbackError(405, "use POST")
        origin = request.headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, request.headers.get("host")):
            raise FeedbackError(403, "requests from this origin are not accepted")
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":  # a type browsers never send cross-site without a preflight
            raise FeedbackError(415, "send the body as application/json")
        # By address: a client can invent user ids (where the header is trusted), not addresses.
        wait = self.limiter.allow(request.client or f"user:{request.user}")
        if wait:
            error = FeedbackError(429, "too many feedback requests; slow down")
            error.retry_after = wait  # type: ignore[attr-defined]
            raise error
        if request.body is None:
            raise FeedbackError(413, f"body larger than {options.feedback_max_bytes} bytes")
        feedback = parse_feedback(request.body, options.feedback_max_bytes)
        if feedback.kind not in options.feedback_kinds:
            raise FeedbackError(403, f"{feedback.kind} is not accepted here", "kind")
        rating = self._authorize(feedback, request)
        accepted = {"feedback_id": rating.feedback_id, "trace_id": rating.trace_id}
        if SPOOLER.down and SPOOLER.spool_rating(rating):  # the tracking server is down: kept
            COUNTS.add("accepted")
            return 202, {**accepted, "status": "spooled", "spool_id": rating.feedback_id}
        if not DELIVERY.submit(rating):
            error = FeedbackError(503, "feedback service busy; try again later")
            error.retry_after = 5  # type: ignore[attr-defined]
            raise error
        return 202, {**accepted, "status": "accepted"}

    def _authorize(self, feedback: Feedback, request: FeedbackRequest) -> Rating:
        """Who may rate which trace, by the app's policy; the rating to deliver."""
        options = self.options
        requester = request.user
        trace_id, must_be_user = feedback.trace_id, None
        if options.feedback_auth == "token":
            token = request.headers.get(options.feedback_token_header.lower())
            claims = self.tokens.verify(token) if self.tokens is not None else None
            if claims is None:
                raise FeedbackError(401, "a valid, unexpired feedback token is required", "token")
            if feedback.trace_id not in (None, claims.trace_id) or feedback.client_request_id not in (
                None,
                claims.client_request_id,
            ):
                raise FeedbackError(403, "the feedback token is for another trace", "token")
            if requester is not None and claims.user is not None and requester != claims.user:
                raise FeedbackError(403, "the feedback token belongs to another user", "token")
            trace_id, source = claims.trace_id, claims.user or requester
        elif options.feedback_auth == "user":
            if requester is None:
                raise FeedbackError(401, "sign in to send feedback")
            source = must_be_user = requester
        else:  # "open": the app's own choice, for trusted clients
            source = requester
        return _rating(
            feedback,
            trace_id=trace_id,
            source=source,
            trace_user=must_be_user,
            experiment_id=app_experiment(options),
            deadline=options.feedback_wait_seconds,
        )

    # --- CORS, for the endpoint alone ---

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        """The app's configured origins, or its own (same-origin requests carry Origin too)."""
        allowed = self.options.feedback_cors_origins
        return origin in allowed or "*" in allowed or (host is not None and urlsplit(origin).netloc == host)

    def _cors(self, request: FeedbackRequest) -> list[tuple[str, str]]:
        origin = request.headers.get("origin")
        allowed = self.options.feedback_cors_origins
        if not origin or not (origin in allowed or "*" in allowed):
            return []
        return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]

    def _preflight(self, cors: list[tuple[str, str]]) -> Answer:
        options = self.options
        allowed = ", ".join(["Content-Type", options.feedback_token_header, options.user_id_header])
        headers = [
            *cors,
            ("Access-Control-Allow-Methods", "POST"),
            ("Access-Control-Allow-Headers", allowed),
            ("Access-Control-Allow-Credentials", "true"),
            ("Access-Control-Max-Age", "600"),
            ("Content-Length", "0"),
        ]
        return 204, headers, b""


# --- the helper for app code ----------------------------------------------------------------------


def log_feedback(
    *,
    trace_id: str | None = None,
    client_request_id: str | None = None,
    value: Any,
    name: str = "user_feedback",
    user: str | None = None,
    rationale: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    kind: str = "feedback",
    experiment_id: str | None = None,
    wait_seconds: float = 10.0,
) -> FeedbackResult:
    """Validate and log one assessment with a HUMAN source, in the caller's thread; raises
    FeedbackError. One assessment per (trace, user, name): a second call updates the first.

    The caller decides who may rate what (this is app code). Feedback often arrives before the
    async exporter has written the trace: a missing trace is retried until `wait_seconds` have
    passed, then it is a 404; MLflow failing throughout is a 503.
    """
    feedback = check_feedback(
        trace_id=trace_id,
        client_request_id=client_request_id,
        value=value,
        name=name,
        rationale=rationale,
        metadata=dict(metadata) if metadata is not None else None,
        kind=kind,
    )
    rating = _rating(
        feedback,
        trace_id=feedback.trace_id,
        source=user,
        trace_user=None,
        experiment_id=experiment_id,
        deadline=wait_seconds,
    )
    try:
        assessment_id, found = deliver_now(rating)
    except DeliveryError as exc:
        field = "trace_id" if trace_id else "client_request_id"
        raise {
            "missing": FeedbackError(404, "no such trace", field),
            "ambiguous": FeedbackError(409, "several traces have this client_request_id", field),
            "refused": FeedbackError(403, "not a trace of this app", field),
        }.get(exc.reason, FeedbackError(503, "tracking server unavailable")) from None
    return FeedbackResult(assessment_id, found)


def _rating(
    feedback: Feedback,
    *,
    trace_id: str | None,
    source: str | None,
    trace_user: str | None,
    experiment_id: str | None,
    deadline: float,
) -> Rating:
    return Rating(
        feedback_id=uuid.uuid4().hex,
        trace_id=trace_id,
        client_request_id=None if trace_id else feedback.client_request_id,
        kind=feedback.kind,
        name=feedback.name,
        value=feedback.value,
        rationale=feedback.rationale,
        metadata=feedback.metadata,
        source_id=clean_id(source, MAX_METADATA_LENGTH) or "anonymous",
        trace_user=trace_user,
        experiment_id=experiment_id,
        deadline_seconds=deadline,
    )


def is_endpoint(raw_path: str | None, path: str) -> bool:
    """The endpoint answers a path only as sent literally: a server decodes /mlflow%2Ffeedback to
    /mlflow/feedback, and an exact-path proxy rule in front would not have matched it. `raw_path`
    is the request target as received (None when the server does not say)."""
    if raw_path is None:
        return True
    return raw_path.split("?", 1)[0] == path


def read_limited(read: Any, content_length: str | None, limit: int) -> bytes | None:
    """Up to `limit` bytes from a file-like `read`; None if the body is larger (then: 413,
    without reading the rest)."""
    try:
        length = int(content_length) if content_length else None
    except ValueError:
        length = None
    if length is not None and length > limit:
        return None
    data = read(limit + 1 if length is None or length < 0 else length)
    return None if len(data) > limit else bytes(data)
