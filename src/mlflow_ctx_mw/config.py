"""One options object shared by the ASGI, WSGI and Django adapters.

Everything that can be decided once is decided here, when the middleware is built: bad options
fail at start-up, environment metadata is read once, header names are normalised once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow_ctx_mw.mapper import RequestView

__all__ = ["DEFAULT_ENV_METADATA", "SENSITIVE_HEADERS", "Options", "OptionsError"]

#: Environment variable -> trace metadata key, read once at start-up, written only when set.
DEFAULT_ENV_METADATA: Mapping[str, str] = MappingProxyType(
    {
        "APP_ENVIRONMENT": "mlflow.source.type",
        "APP_VERSION": "app_version",
        "DEPLOYMENT_ID": "deployment_id",
        "REGION": "region",
    }
)

#: Headers that carry credentials: they may never be mapped into a trace.
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})

# RFC 9110 token: what a header field name may be.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

RequestHook = Callable[["RequestView"], "Mapping[str, Mapping[str, str]] | None"]


class OptionsError(ValueError):
    """A middleware option is unknown or has a bad value (raised at start-up)."""


def _header_name(option: str, value: object) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise OptionsError(f"{option}: {value!r} is not a valid HTTP header name")
    return value


def _str_map(option: str, value: object, *, headers: str = "") -> Mapping[str, str]:
    """Validate a str->str mapping; `headers` names the side that holds header names."""
    if not isinstance(value, Mapping):
        raise OptionsError(f"{option}: expected a mapping of str to str, got {type(value).__name__}")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not key or not isinstance(val, str) or not val:
            raise OptionsError(f"{option}: keys and values must be non-empty strings, got {key!r}: {val!r}")
        if headers == "key":
            _header_name(option, key)
            if key.lower() in SENSITIVE_HEADERS:
                raise OptionsError(f"{option}: {key!r} carries credentials and is never recorded")
            key = key.lower()
        out[key] = val
    return MappingProxyType(out)


@dataclass(frozen=True)
class Options:
    """What the middleware records and how. Same keys as kwargs, Django's MLFLOW_CTX, or here."""

    request_id_header: str = "X-Request-ID"
    session_id_header: str = "X-Session-ID"
    user_id_header: str = "X-User-ID"
    trace_id_header: str = "X-Trace-ID"
    #: Echo the (possibly generated) request id in the response.
    echo_request_id: bool = True
    #: Add the trace/request id headers to Access-Control-Expose-Headers (merged, never replaced).
    expose_headers: bool = True
    env_metadata: Mapping[str, str] = field(default_factory=lambda: DEFAULT_ENV_METADATA)
    #: Request header -> trace metadata key (immutable once logged: right for ids).
    header_metadata: Mapping[str, str] = field(default_factory=dict)
    #: Request header -> trace tag key (mutable later).
    header_tags: Mapping[str, str] = field(default_factory=dict)
    static_metadata: Mapping[str, str] = field(default_factory=dict)
    static_tags: Mapping[str, str] = field(default_factory=dict)
    #: Called per request with a RequestView; returns {"metadata": {...}, "tags": {...}} or None.
    #: Its failures are logged once and the request goes on.
    request_hook: RequestHook | None = None
    #: Export to this experiment (set once at start-up, no network call). None: the app's own
    #: mlflow.set_experiment / set_destination decides.
    experiment_id: str | None = None
    #: The built-in feedback endpoint (POST, JSON); None turns it off.
    feedback_path: str | None = "/mlflow/feedback"
    feedback_max_bytes: int = 64 * 1024
    #: How long feedback waits for a trace the async exporter has not written yet.
    feedback_wait_seconds: float = 10.0

    # Derived once at start-up.
    env_values: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("request_id_header", "session_id_header", "user_id_header", "trace_id_header"):
            value = _header_name(name, getattr(self, name))
            if value.lower() in SENSITIVE_HEADERS:
                raise OptionsError(f"{name}: {value!r} carries credentials and is never recorded")
        for name in ("echo_request_id", "expose_headers"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.request_hook is not None and not callable(self.request_hook):
            raise OptionsError(f"request_hook: expected a callable, got {self.request_hook!r}")
        if self.experiment_id is not None and (
            not isinstance(self.experiment_id, str) or not self.experiment_id.strip()
        ):
            raise OptionsError(f"experiment_id: expected a non-empty string, got {self.experiment_id!r}")
        if self.feedback_path is not None and (
            not isinstance(self.feedback_path, str) or not self.feedback_path.startswith("/")
        ):
            raise OptionsError(
                f"feedback_path: expected a path starting with '/' or None, got {self.feedback_path!r}"
            )
        if (
            isinstance(self.feedback_max_bytes, bool)
            or not isinstance(self.feedback_max_bytes, int)
            or (self.feedback_max_bytes <= 0)
        ):
            raise OptionsError(
                f"feedback_max_bytes: expected a positive int, got {self.feedback_max_bytes!r}"
            )
        wait = self.feedback_wait_seconds
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 120:
            raise OptionsError(f"feedback_wait_seconds: expected 0-120 seconds, got {wait!r}")
        set_ = object.__setattr__
        set_(self, "env_metadata", _str_map("env_metadata", self.env_metadata))
        set_(self, "header_metadata", _str_map("header_metadata", self.header_metadata, headers="key"))
        set_(self, "header_tags", _str_map("header_tags", self.header_tags, headers="key"))
        set_(self, "static_metadata", _str_map("static_metadata", self.static_metadata))
        set_(self, "static_tags", _str_map("static_tags", self.static_tags))
        env = {key: os.environ[var] for var, key in self.env_metadata.items() if os.environ.get(var)}
        set_(self, "env_values", MappingProxyType(env))

    @classmethod
    def build(cls, options: Options | Mapping[str, Any] | None = None, **kwargs: Any) -> Options:
        """Options from an Options object, a mapping (Django settings) and/or kwargs."""
        if isinstance(options, Options):
            return dataclasses.replace(options, **kwargs) if kwargs else options
        merged = {**(options or {}), **kwargs}
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise OptionsError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**merged)
