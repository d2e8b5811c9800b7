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
from typing import Any

from mlflow_ctx_mw.security import (
    DEFAULT_REDACTED_PARAMS,
    FeedbackTokens,
    Network,
    is_credential_header,
    parse_networks,
)
from mlflow_ctx_mw.view import RequestView

__all__ = ["DEFAULT_ENV_METADATA", "FEEDBACK_SECRET_ENV", "Options", "OptionsError"]

#: Environment variable -> trace metadata key, read once at start-up, written only when set.
DEFAULT_ENV_METADATA: Mapping[str, str] = MappingProxyType(
    {
        "APP_ENVIRONMENT": "mlflow.source.type",
        "APP_VERSION": "app_version",
        "DEPLOYMENT_ID": "deployment_id",
        "REGION": "region",
    }
)

#: Where the secret that signs feedback tokens comes from when the code does not pass one.
FEEDBACK_SECRET_ENV = "MLFLOW_CTX_FEEDBACK_SECRET"
MIN_SECRET_LENGTH = 16
FEEDBACK_POLICIES = ("token", "user", "open")

# Response headers the HTTP stack owns: ours may not be named like one (the answer would break).
_RESERVED_RESPONSE = frozenset(
    {"age", "allow", "alt-svc", "cache-control", "connection", "cookie", "date", "etag", "expires",
     "host", "keep-alive", "last-modified", "link", "location", "pragma", "refresh", "retry-after",
     "server", "set-cookie", "strict-transport-security", "te", "trailer", "transfer-encoding",
     "upgrade", "vary", "via", "www-authenticate", "x-content-type-options", "x-frame-options"}
)  # fmt: skip
_RESERVED_PREFIXES = ("content-", "access-control-", "proxy-", "sec-")

# RFC 9110 token: what a header field name may be.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

RequestHook = Callable[[RequestView], "Mapping[str, Mapping[str, str]] | None"]
UserResolver = Callable[[RequestView], "str | None"]
#: redact(field, value) -> the value to record, or None to record nothing.
Redactor = Callable[[str, str], "str | None"]


class OptionsError(ValueError):
    """A middleware option is unknown or has a bad value (raised at start-up)."""


def _header_name(option: str, value: object) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise OptionsError(f"{option}: {value!r} is not a valid HTTP header name")
    return value


def _recorded_header(option: str, value: object) -> str:
    """A request header whose value goes into traces: never one that carries credentials."""
    name = _header_name(option, value)
    if is_credential_header(name):
        raise OptionsError(f"{option}: {name!r} carries credentials and is never recorded")
    return name


def _response_header(option: str, value: object) -> str:
    """A header the middleware adds to responses: never one the HTTP stack owns."""
    name = _header_name(option, value)
    lower = name.lower()
    if lower in _RESERVED_RESPONSE or lower.startswith(_RESERVED_PREFIXES):
        raise OptionsError(f"{option}: {name!r} is a standard HTTP header; name ours like X-Trace-ID")
    return name


def _str_map(option: str, value: object, *, headers: str = "") -> Mapping[str, str]:
    """Validate a str->str mapping; `headers` names the side that holds header names."""
    if not isinstance(value, Mapping):
        raise OptionsError(f"{option}: expected a mapping of str to str, got {type(value).__name__}")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not key or not isinstance(val, str) or not val:
            raise OptionsError(f"{option}: keys and values must be non-empty strings, got {key!r}: {val!r}")
        if headers == "key":
            key = _recorded_header(option, key).lower()
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
    #: How long an accepted rating waits (in the background) for its trace to be stored.
    feedback_wait_seconds: float = 60.0
    #: Who may rate a trace: "token" (the X-Feedback-Token handed out with its response),
    #: "user" (the app's authenticated user, on that user's traces), "open" (anyone: trusted
    #: clients only).
    feedback_auth: str = "token"
    #: Signs feedback tokens (or several: the first signs, all verify). Default: the
    #: MLFLOW_CTX_FEEDBACK_SECRET variable, else Django's SECRET_KEY / Flask's secret_key.
    feedback_secret: str | Sequence[str] | None = None
    feedback_token_header: str = "X-Feedback-Token"
    #: How long a feedback token is valid (seconds).
    feedback_token_ttl: float = 3 * 3600.0
    #: What clients may send: "feedback", and "expectation" (ground truth) only when listed.
    feedback_kinds: Sequence[str] = ("feedback",)
    #: Feedback requests per client per minute (0: no limit).
    feedback_rate_limit: int = 60
    #: Origins whose browsers may post feedback cross-site; their CORS preflights are answered.
    feedback_cors_origins: Sequence[str] = ()
    #: Paths served untraced (no span, no X-Trace-ID): "/health" exact, "/static/*" prefix,
    #: "^/v[0-9]+/ping$" a regular expression (re.match).
    exclude_paths: Sequence[str] = ()
    #: Keep what MLflow cannot take now (server down, failing, or behind) on disk, and send it
    #: when it can: traces, and ratings from the feedback endpoint (README: *Outages*).
    spool: bool = True
    #: Default: $MLFLOW_CTX_SPOOL_DIR, else ~/.local/state/mlflow-ctx-mw/spool. A subdirectory per
    #: tracking server and experiment name; every worker process of the app shares it.
    spool_dir: str | None = None
    #: Past either bound the oldest entries are dropped (counted: export_stats().expired_entries).
    spool_max_bytes: int = 256 * 1024 * 1024
    spool_max_age_seconds: float = 3 * 86400.0
    #: Replayed entries per second at most, once the server answers again.
    spool_replay_per_second: float = 20.0
    #: fsync each entry: survives a power loss too, not only the process's death (costs a disk
    #: flush per spooled trace, in the background).
    spool_fsync: bool = False
    #: Share of the other requests that are traced; the rest run with MLflow tracing off.
    sample_ratio: float = 1.0
    #: At shutdown (SIGTERM, ASGI lifespan), wait this long for pending traces to reach MLflow.
    shutdown_flush_seconds: float = 10.0
    #: How long after start-up requests may wait for the experiment to be resolved (an ASGI
    #: lifespan startup waits instead), so that a cold start traces its first requests.
    startup_wait_seconds: float = 10.0
    #: The request's user id. None: the framework's authenticated user (Django request.user,
    #: Starlette scope["user"], Flask-Login), else the user header if trusted.
    user_resolver: UserResolver | None = None
    #: May the X-User-ID header name the user? None (auto): only in an app with no
    #: authentication the middleware can see; True: when nobody is logged in; False: never.
    trust_user_header: bool | None = None
    #: Link this request's trace to a caller's W3C `traceparent`: False (default: anyone can
    #: send one), True, or the networks of trusted callers ("10.0.0.0/8", "127.0.0.1").
    accept_traceparent: bool | Sequence[str] = False
    #: Query parameters whose values are recorded as REDACTED (compared without case).
    redact_query_params: Sequence[str] = DEFAULT_REDACTED_PARAMS
    #: redact(field, value) -> value or None, for every recorded field (metadata, tags, url.path,
    #: url.query); its failure drops the value.
    redact: Redactor | None = None

    # Derived once at start-up.
    env_values: Mapping[str, str] = field(init=False, repr=False, compare=False)
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _prefixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    #: Lower-case names of the response headers the middleware may set (latin-1 bytes, as ASGI).
    response_header_names: frozenset[bytes] = field(init=False, repr=False, compare=False)
    #: Lower-case request header names, as mappings of headers are keyed.
    request_keys: tuple[str, str, str] = field(init=False, repr=False, compare=False)
    #: The trace id, request id and feedback token response header names as ASGI bytes.
    response_header_keys: tuple[bytes, bytes, bytes] = field(init=False, repr=False, compare=False)
    #: Access-Control-Expose-Headers value as ASGI bytes: [without, with] a trace id header.
    expose_values: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)
    #: Signs and checks feedback tokens (token policy with the endpoint on; else None).
    feedback_tokens: FeedbackTokens | None = field(init=False, repr=False, compare=False)
    traceparent_peers: tuple[Network, ...] = field(init=False, repr=False, compare=False)
    redacted_params: frozenset[str] = field(init=False, repr=False, compare=False)

    def excluded(self, path: str) -> bool:
        """Whether `path` is served untraced (cheap: a set lookup when nothing else is set)."""
        return (
            path in self._exact
            or (bool(self._prefixes) and path.startswith(self._prefixes))
            or (self._pattern is not None and self._pattern.match(path) is not None)
        )

    def __post_init__(self) -> None:
        for name in ("request_id_header", "session_id_header", "user_id_header"):
            _recorded_header(name, getattr(self, name))
        ours = [self.trace_id_header, self.feedback_token_header]
        ours += [self.request_id_header] if self.echo_request_id else []
        _response_header("trace_id_header", self.trace_id_header)
        _response_header("feedback_token_header", self.feedback_token_header)
        if self.echo_request_id:
            _response_header("request_id_header", self.request_id_header)
        if len({name.lower() for name in ours}) < len(ours):
            raise OptionsError(f"response headers must differ: {', '.join(ours)}")
        for name in ("echo_request_id", "expose_headers"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not (self.trust_user_header is None or isinstance(self.trust_user_header, bool)):
            trust = self.trust_user_header
            raise OptionsError(f"trust_user_header: expected None (auto), True or False, got {trust!r}")
        for name in ("request_hook", "user_resolver", "redact"):
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
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 3600:
            raise OptionsError(f"feedback_wait_seconds: expected 0-3600 seconds, got {wait!r}")
        for name in ("shutdown_flush_seconds", "startup_wait_seconds"):
            seconds = getattr(self, name)
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= 600:
                raise OptionsError(f"{name}: expected 0-600 seconds, got {seconds!r}")
        self._check_spool()
        ratio = self.sample_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
            raise OptionsError(f"sample_ratio: expected a number from 0 to 1, got {ratio!r}")
        set_ = object.__setattr__
        self._feedback_policy(set_)
        set_(self, "traceparent_peers", self._peers())
        params = self.redact_query_params
        if isinstance(params, str) or not all(isinstance(p, str) and p for p in params):
            raise OptionsError(f"redact_query_params: expected a list of parameter names, got {params!r}")
        set_(self, "redacted_params", frozenset(p.lower() for p in params))
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
        keys = (self.trace_id_header, self.request_id_header, self.feedback_token_header)
        set_(self, "response_header_keys", tuple(name.lower().encode("latin-1") for name in keys))
        echoed = [self.request_id_header] if self.echo_request_id else []
        traced = [self.trace_id_header, *([self.feedback_token_header] if self.feedback_tokens else [])]
        exposed = (", ".join(echoed), ", ".join([*traced, *echoed]))
        set_(self, "expose_values", tuple(value.encode("latin-1") for value in exposed))

    def _feedback_policy(self, set_: Callable[[object, str, object], None]) -> None:
        if self.feedback_auth not in FEEDBACK_POLICIES:
            policies = ", ".join(FEEDBACK_POLICIES)
            raise OptionsError(f"feedback_auth: expected one of {policies}, got {self.feedback_auth!r}")
        kinds = self.feedback_kinds
        if isinstance(kinds, str) or not set(kinds) <= {"feedback", "expectation"}:
            raise OptionsError(f"feedback_kinds: a list of 'feedback' and/or 'expectation', got {kinds!r}")
        set_(self, "feedback_kinds", tuple(kinds))
        ttl = self.feedback_token_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 60 <= ttl <= 30 * 86400:
            raise OptionsError(f"feedback_token_ttl: expected 60 s to 30 days, got {ttl!r}")
        rate = self.feedback_rate_limit
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
            raise OptionsError(f"feedback_rate_limit: expected requests per minute (0: none), got {rate!r}")
        origins = self.feedback_cors_origins
        if isinstance(origins, str) or not all(
            isinstance(o, str) and ("://" in o or o == "*") for o in origins
        ):
            raise OptionsError(f"feedback_cors_origins: origins like 'https://app.example', got {origins!r}")
        set_(self, "feedback_cors_origins", frozenset(o.rstrip("/") for o in origins))
        secret = self.feedback_secret
        secret = os.environ.get(FEEDBACK_SECRET_ENV) if secret is None else secret
        secrets = [secret] if isinstance(secret, str) else list(secret or [])
        if any(not isinstance(s, str) or len(s) < MIN_SECRET_LENGTH for s in secrets):
            raise OptionsError(f"feedback_secret: secrets must be strings of {MIN_SECRET_LENGTH}+ characters")
        needed = self.feedback_path is not None and self.feedback_auth == "token"
        if needed and not secrets:
            raise OptionsError(
                "feedback_auth='token' (the default) signs the feedback tokens handed to clients: set "
                f"{FEEDBACK_SECRET_ENV} to a random string (the same in every worker; e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'), or pass feedback_secret=. "
                "Or choose feedback_auth='user' or 'open', or turn the endpoint off with feedback_path=None."
            )
        set_(self, "feedback_tokens", FeedbackTokens(secrets, ttl) if needed else None)

    def _check_spool(self) -> None:
        for name in ("spool", "spool_fsync"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.spool_dir is not None and (not isinstance(self.spool_dir, str) or not self.spool_dir):
            raise OptionsError(f"spool_dir: expected a directory path or None, got {self.spool_dir!r}")
        size = self.spool_max_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size < 1024 * 1024:
            raise OptionsError(f"spool_max_bytes: expected an int of at least 1 MiB, got {size!r}")
        bounds = (("spool_max_age_seconds", 60, 365 * 86400), ("spool_replay_per_second", 0.1, 10_000))
        for name, low, high in bounds:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise OptionsError(f"{name}: expected {low:g} to {high:g}, got {value!r}")

    def _peers(self) -> tuple[Network, ...]:
        accept = self.accept_traceparent
        if isinstance(accept, bool):
            return ()
        if isinstance(accept, str):
            raise OptionsError("accept_traceparent: expected True, False or a list of networks")
        try:
            return parse_networks(accept)
        except (ValueError, TypeError) as exc:
            raise OptionsError(f"accept_traceparent: {exc}") from None

    def traceparent_trusted(self, client: str | None) -> bool:
        """May this peer's traceparent link our trace to its own?"""
        accept = self.accept_traceparent
        if isinstance(accept, bool):
            return accept
        from mlflow_ctx_mw.security import peer_in

        return peer_in(client, self.traceparent_peers)

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
    def build(
        cls,
        options: Options | Mapping[str, Any] | None = None,
        *,
        default_secret: str | None = None,
        **kwargs: Any,
    ) -> Options:
        """Options from an Options object, a mapping (Django settings) and/or kwargs.

        `default_secret` is the framework's own secret (Django's SECRET_KEY, Flask's secret_key),
        used for feedback tokens when neither the options nor the environment name one.
        """
        if isinstance(options, Options):
            return dataclasses.replace(options, **kwargs) if kwargs else options
        merged = {**(options or {}), **kwargs}
        if (
            merged.get("feedback_secret") is None
            and not os.environ.get(FEEDBACK_SECRET_ENV)
            and default_secret
        ):
            merged["feedback_secret"] = default_secret
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise OptionsError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**merged)
