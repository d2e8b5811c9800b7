"""Feedback on a trace from clients that cannot call MLflow themselves (browsers, mobile apps).

`log_feedback(...)` is the helper for app code with its own route; `handle_feedback(...)` is the
built-in endpoint every adapter answers (POST, JSON, one assessment per call: several dimensions
are several calls). Both validate the same way and raise/answer `FeedbackError` with an HTTP
status and the field at fault; no MLflow error text or stack trace reaches the client.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from mlflow_ctx_mw import _mlflow
from mlflow_ctx_mw._logonce import log_once
from mlflow_ctx_mw._recent import RECENT
from mlflow_ctx_mw.config import Options
from mlflow_ctx_mw.destination import app_experiment
from mlflow_ctx_mw.mapper import (
    MAX_ID_LENGTH,
    MAX_METADATA_LENGTH,
    RequestView,
    clean_id,
    clean_text,
    resolve_user,
)

__all__ = ["FeedbackError", "FeedbackResult", "declared_too_large", "feedback_response", "log_feedback"]

logger = logging.getLogger("mlflow_ctx_mw")

MAX_TRACE_ID_LENGTH = 128
MAX_NAME_LENGTH = 250
MAX_TEXT_VALUE = 10_000
MAX_RATIONALE = 10_000
MAX_ITEMS = 100
FIELDS = frozenset({"trace_id", "client_request_id", "value", "name", "rationale", "metadata", "kind"})
Scalar = bool | int | float | str


class FeedbackError(Exception):
    """A feedback call that cannot be logged; `status` is the HTTP answer."""

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


def _invalid(field: str, message: str) -> FeedbackError:
    return FeedbackError(422, f"{field}: {message}", field)


def _scalar(value: object, field: str) -> Scalar:
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _invalid(field, "numbers must be finite")
        return value
    if isinstance(value, str):
        if len(value) > MAX_TEXT_VALUE:
            raise _invalid(field, f"text longer than {MAX_TEXT_VALUE} characters")
        return value
    raise _invalid(field, "expected a boolean, number or string")


def _value(value: object) -> Scalar | list[Scalar] | dict[str, Scalar]:
    """What mlflow.log_feedback accepts: a scalar, or a flat list/object of scalars."""
    if value is None:
        raise _invalid("value", "required")
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise _invalid("value", f"at most {MAX_ITEMS} items")
        return [_scalar(item, "value") for item in value]
    if isinstance(value, dict):
        return _flat_object(value, "value")
    return _scalar(value, "value")


def _flat_object(value: object, field: str) -> dict[str, Scalar]:
    if not isinstance(value, dict):
        raise _invalid(field, "expected an object")
    if len(value) > MAX_ITEMS:
        raise _invalid(field, f"at most {MAX_ITEMS} keys")
    out: dict[str, Scalar] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or len(key) > MAX_NAME_LENGTH:
            raise _invalid(field, f"keys must be 1-{MAX_NAME_LENGTH} characters")
        out[key] = _scalar(item, field)
    return out


def _text(value: object, field: str, limit: int, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _invalid(field, "expected a string")
    if len(value) > limit:
        raise _invalid(field, f"longer than {limit} characters")
    cleaned = clean_text(value, limit)
    if required and not cleaned:
        raise _invalid(field, "must not be empty")
    return cleaned


def _ids(trace_id: object, client_request_id: object) -> tuple[str | None, str | None]:
    if (trace_id is None) == (client_request_id is None):
        raise FeedbackError(422, "give exactly one of trace_id or client_request_id", "trace_id")
    if trace_id is not None:
        if (clean := clean_id(trace_id, MAX_TRACE_ID_LENGTH)) is None:  # type: ignore[arg-type]
            raise _invalid("trace_id", "not a trace id")
        return clean, None
    if (clean := clean_id(client_request_id, MAX_ID_LENGTH)) is None:  # type: ignore[arg-type]
        raise _invalid(
            "client_request_id",
            f"1-{MAX_ID_LENGTH} printable characters without spaces, quotes, backticks or backslashes",
        )
    return None, clean


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
    timeout_seconds: float = 10.0,
) -> FeedbackResult:
    """Validate and log one assessment with a HUMAN source; raises FeedbackError.

    Feedback often arrives before the async exporter has written the trace: a missing trace is
    retried until `wait_seconds` have passed, then it is a 404. MLflow being unreachable or
    slower than `timeout_seconds` is a 503.
    """
    trace_id, client_request_id = _ids(trace_id, client_request_id)
    checked_value = _value(value)
    checked_name = _text(name, "name", MAX_NAME_LENGTH, required=True)
    checked_rationale = _text(rationale, "rationale", MAX_RATIONALE)
    checked_metadata = _flat_object(metadata, "metadata") if metadata is not None else None
    if kind not in ("feedback", "expectation"):
        raise _invalid("kind", "'feedback' or 'expectation'")
    if kind == "expectation" and checked_rationale:
        raise _invalid("rationale", "expectations take no rationale")
    source_id = clean_id(user, MAX_METADATA_LENGTH) if user else None

    field = "trace_id" if trace_id else "client_request_id"
    deadline = time.monotonic() + wait_seconds
    delay, flushed = 0.1, False
    while True:
        found = trace_id or RECENT.trace_for(client_request_id or "")
        found = found or _bounded(timeout_seconds, _find, client_request_id, experiment_id)
        if found is not None:
            assessment_id = _bounded(
                timeout_seconds,
                _mlflow.log_assessment,
                kind,
                trace_id=found,
                name=checked_name or "user_feedback",
                value=checked_value,
                source_id=source_id or "anonymous",
                rationale=checked_rationale,
                metadata=checked_metadata,
            )
            if assessment_id is not None:
                return FeedbackResult(assessment_id, found)
            if not flushed and found in RECENT:
                # Ours, still on its way to the server: export it now rather than wait.
                _bounded(timeout_seconds, _mlflow.flush_export)
                flushed = True
                continue
        if time.monotonic() + delay > deadline:
            raise FeedbackError(404, "no such trace", field)
        time.sleep(delay)  # the caller's thread waits; no pool slot is held meanwhile
        delay = min(delay * 2, 1.0)


def _find(client_request_id: str | None, experiment_id: str | None) -> str | None:
    found = _mlflow.find_traces_by_client_request_id(client_request_id or "", experiment_id)
    if len(found) > 1:
        raise FeedbackError(
            409, "several traces have this client_request_id; use trace_id", "client_request_id"
        )
    return found[0] if found else None


# MLflow's HTTP client retries for minutes when the server is down: run calls on a small pool
# and give up waiting (503) after a bound; a full pool answers 503 at once instead of queueing.
_POOL_SIZE = 8
_pool = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="mlflow-ctx-feedback")
_slots = threading.BoundedSemaphore(_POOL_SIZE)


def _bounded(timeout: float, call: Any, *args: Any, **kwargs: Any) -> Any:
    """One MLflow call on the pool, waited for at most `timeout` seconds."""
    if not _slots.acquire(blocking=False):
        raise FeedbackError(503, "feedback service busy; try again later")
    try:
        future = _pool.submit(call, *args, **kwargs)
    except Exception:
        _slots.release()
        raise
    future.add_done_callback(lambda _: _slots.release())
    try:
        return future.result(timeout=timeout)
    except FeedbackError:
        raise
    except FutureTimeout:
        log_once("feedback-timeout", "MLflow did not answer a feedback call in time", exc_info=False)
        raise FeedbackError(503, "tracking server unavailable") from None
    except Exception:
        log_once("feedback-error", "MLflow failed a feedback call")
        raise FeedbackError(503, "tracking server unavailable") from None


def parse_body(body: bytes, max_bytes: int) -> dict[str, Any]:
    if len(body) > max_bytes:
        raise FeedbackError(413, f"body larger than {max_bytes} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FeedbackError(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise FeedbackError(422, "body: expected a JSON object", "body")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise _invalid(unknown[0], f"unknown field; expected {', '.join(sorted(FIELDS))}")
    return data


def handle_feedback(options: Options, user: str | None, body: bytes) -> tuple[int, dict[str, Any]]:
    """The built-in endpoint, framework-free: (status, JSON payload). Never raises."""
    try:
        data = parse_body(body, options.feedback_max_bytes)
        result = log_feedback(
            trace_id=data.get("trace_id"),
            client_request_id=data.get("client_request_id"),
            value=data.get("value"),
            name=data.get("name", "user_feedback"),
            user=user,
            rationale=data.get("rationale"),
            metadata=data.get("metadata"),
            kind=data.get("kind", "feedback"),
            experiment_id=app_experiment(options),
            wait_seconds=options.feedback_wait_seconds,
        )
        return 201, {"assessment_id": result.assessment_id, "trace_id": result.trace_id}
    except FeedbackError as exc:
        return exc.status, exc.payload()
    except Exception:
        log_once("feedback-bug", "mlflow_ctx_mw failed to handle a feedback request")
        return 500, {"error": "internal error"}


def feedback_response(
    options: Options, view: RequestView, body: bytes | None
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and JSON body for the built-in endpoint. `body` None means: over the limit.

    The assessment's source id is the request's user, resolved as for traces.
    """
    method = view.method
    if method != "POST":
        status, payload = 405, {"error": "use POST"}
    elif body is None:
        status, payload = 413, {"error": f"body larger than {options.feedback_max_bytes} bytes"}
    else:
        status, payload = handle_feedback(options, resolve_user(options, view), body)
    out = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
    if status == 405:
        out.append(("Allow", "POST"))
    return status, out, json.dumps(payload).encode()


def declared_too_large(options: Options, content_length: str | None) -> bool:
    """A Content-Length over the limit: answer 413 without reading the body."""
    try:
        return content_length is not None and int(content_length) > options.feedback_max_bytes
    except ValueError:
        return False


def read_limited(read: Any, content_length: str | None, limit: int) -> bytes | None:
    """Up to `limit` bytes from a file-like `read`; None if the body is larger (then: 413)."""
    try:
        length = int(content_length) if content_length else None
    except ValueError:
        length = None
    if length is not None and length > limit:
        return None
    data = read(limit + 1 if length is None else length)
    return None if len(data) > limit else bytes(data)
