"""One options object shared by the ASGI, WSGI and Django adapters.

Everything that can be decided once is decided here, when the middleware is built: bad options
fail at start-up, environment metadata is read once, header names are normalised once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
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
UserResolver = Callable[["RequestView"], "str | None"]


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
    #: Paths served untraced (no span, no X-Trace-ID): "/health" exact, "/static/*" prefix,
    #: "^/v[0-9]+/ping$" a regular expression (re.match).
    exclude_paths: Sequence[str] = ()
    #: Share of the other requests that are traced; the rest run with MLflow tracing off.
    sample_ratio: float = 1.0
    #: At ASGI lifespan shutdown, wait this long for pending traces to reach MLflow.
    shutdown_flush_seconds: float = 10.0
    #: The request's user id. None: the framework's authenticated user (Django request.user,
    #: Starlette scope["user"], Flask-Login), else the user header if trusted.
    user_resolver: UserResolver | None = None
    #: May the X-User-ID header name the user when no authenticated user exists?
    trust_user_header: bool = True
    #: Link this request's trace to a caller's W3C `traceparent` (turn off for public endpoints).
    accept_traceparent: bool = True

    # Derived once at start-up.
    env_values: Mapping[str, str] = field(init=False, repr=False, compare=False)
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _prefixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    #: Lower-case names of the response headers the middleware may set (latin-1 bytes, as ASGI).
    response_header_names: frozenset[bytes] = field(init=False, repr=False, compare=False)
    #: Lower-case request header names, as mappings of headers are keyed.
    request_keys: tuple[str, str, str] = field(init=False, repr=False, compare=False)
    #: The trace id and request id response header names as ASGI bytes (lower case).
    response_header_keys: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)
    #: Access-Control-Expose-Headers value as ASGI bytes: [without, with] a trace id header.
    expose_values: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)

    def excluded(self, path: str) -> bool:
        """Whether `path` is served untraced (cheap: a set lookup when nothing else is set)."""
        return (
            path in self._exact
            or (bool(self._prefixes) and path.startswith(self._prefixes))
            or (self._pattern is not None and self._pattern.match(path) is not None)
        )

    def __post_init__(self) -> None:
        for name in ("request_id_header", "session_id_header", "user_id_header", "trace_id_header"):
            value = _header_name(name, getattr(self, name))
            if value.lower() in SENSITIVE_HEADERS:
                raise OptionsError(f"{name}: {value!r} carries credentials and is never recorded")
        for name in ("echo_request_id", "expose_headers", "trust_user_header", "accept_traceparent"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("request_hook", "user_resolver"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise OptionsError(f"{name}: expected a callable, got {getattr(self, name)!r}")
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
        flush = self.shutdown_flush_seconds
        if isinstance(flush, bool) or not isinstance(flush, int | float) or not 0 <= flush <= 600:
            raise OptionsError(f"shutdown_flush_seconds: expected 0-600 seconds, got {flush!r}")
        ratio = self.sample_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
            raise OptionsError(f"sample_ratio: expected a number from 0 to 1, got {ratio!r}")
        set_ = object.__setattr__
        set_(self, "exclude_paths", tuple(self._exclusions()))
        set_(self, "env_metadata", _str_map("env_metadata", self.env_metadata))
        set_(self, "header_metadata", _str_map("header_metadata", self.header_metadata, headers="key"))
        set_(self, "header_tags", _str_map("header_tags", self.header_tags, headers="key"))
        set_(self, "static_metadata", _str_map("static_metadata", self.static_metadata))
        set_(self, "static_tags", _str_map("static_tags", self.static_tags))
        env = {key: os.environ[var] for var, key in self.env_metadata.items() if os.environ.get(var)}
        set_(self, "env_values", MappingProxyType(env))
        names = [self.trace_id_header]
        names += [self.request_id_header] if self.echo_request_id else []
        names += ["access-control-expose-headers"] if self.expose_headers else []
        set_(self, "response_header_names", frozenset(n.lower().encode("latin-1") for n in names))
        keys = (self.request_id_header, self.session_id_header, self.user_id_header)
        set_(self, "request_keys", tuple(name.lower() for name in keys))
        ours = (self.trace_id_header, self.request_id_header)
        set_(self, "response_header_keys", tuple(name.lower().encode("latin-1") for name in ours))
        echoed = [self.request_id_header] if self.echo_request_id else []
        exposed = (", ".join(echoed), ", ".join([self.trace_id_header, *echoed]))
        set_(self, "expose_values", tuple(value.encode("latin-1") for value in exposed))

    def _exclusions(self) -> list[str]:
        if isinstance(self.exclude_paths, str) or not isinstance(self.exclude_paths, Sequence | set):
            raise OptionsError(f"exclude_paths: expected a list of paths, got {self.exclude_paths!r}")
        exact, prefixes, patterns = set(), [], []
        for entry in self.exclude_paths:
            if not isinstance(entry, str) or not entry:
                raise OptionsError(f"exclude_paths: entries must be non-empty strings, got {entry!r}")
            if entry.startswith("^"):
                try:
                    patterns.append(re.compile(entry).pattern)
                except re.error as exc:
                    raise OptionsError(f"exclude_paths: bad regular expression {entry!r}: {exc}") from None
            elif entry.endswith("*"):
                prefixes.append(entry[:-1])
            else:
                exact.add(entry)
        object.__setattr__(self, "_exact", frozenset(exact))
        object.__setattr__(self, "_prefixes", tuple(prefixes))
        object.__setattr__(
            self, "_pattern", re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        )
        return list(self.exclude_paths)

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
