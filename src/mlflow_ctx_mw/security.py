"""What a client may send and do: feedback tokens, per-client rate limits, trusted peers, and the
values never to record (credential headers, secrets in query strings).

Plain functions and small objects over `Options`: no framework, no MLflow, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import itertools
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

__all__ = [
    "REDACTED",
    "FeedbackTokens",
    "RateLimiter",
    "TokenClaims",
    "is_credential_header",
    "parse_networks",
    "peer_in",
    "redact_query",
]

# --- headers that carry credentials ------------------------------------------------------------

# By pattern, not a list of five: X-Auth-Token, X-Amz-Security-Token, Api-Key, X-Goog-Api-Key,
# X-CSRFToken, Proxy-Authorization, Cookie, X-Client-Secret, X-Hub-Signature-256, X-Auth...
# Judged on the name's words, so that X-Session-ID or oauth2-proxy's X-Auth-Request-User (ids,
# not secrets) stay usable.
_SECRET_WORDS = frozenset(
    {"authorization", "cookie", "token", "secret", "password", "passwd", "apikey", "csrftoken",
     "xsrftoken", "csrf", "xsrf", "signature", "credential", "credentials", "bearer", "jwt", "otp"}
)  # fmt: skip
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("session", "key"), ("private", "key")})
_WORDS = re.compile(r"[-_.\s]+")


def is_credential_header(name: str) -> bool:
    """A header whose value is (or may be) a credential: never mapped into a trace."""
    words = [word for word in _WORDS.split(name.lower()) if word]
    if not words:
        return False
    return (
        any(word in _SECRET_WORDS for word in words)
        or any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))
        or words[-1] in ("auth", "key")
    )


# --- secrets in query strings --------------------------------------------------------------------

REDACTED = "REDACTED"
#: OpenTelemetry's HTTP conventions redact these by default (url.query), plus names apps use.
DEFAULT_REDACTED_PARAMS = (
    "AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature", "X-Amz-Signature", "X-Amz-Credential",
    "X-Amz-Security-Token", "token", "access_token", "refresh_token", "id_token", "api_key", "apikey",
    "key", "code", "password", "passwd", "secret", "client_secret", "session", "sessionid", "auth",
)  # fmt: skip


def redact_query(query: str, names: frozenset[str]) -> str:
    """The query string with the values of sensitive parameters replaced (names compared without
    case); the rest kept as sent. Cheap when there is nothing to redact."""
    if not query or not names:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(name.lower() in names for name, _ in pairs):
        return query
    return "&".join(
        f"{quote(name, safe='')}={REDACTED if name.lower() in names else quote(value, safe='')}"
        for name, value in pairs
    )


# --- trusted peers ---------------------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings ("10.0.0.0/8", "127.0.0.1") -> networks; raises ValueError on a bad one."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def peer_in(address: str | None, networks: Sequence[Network]) -> bool:
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


# --- feedback tokens -------------------------------------------------------------------------------

_CONTEXT = b"mlflow-ctx-mw/feedback-token/v1\x00"
MAX_TOKEN_LENGTH = 2048


@dataclass(frozen=True)
class TokenClaims:
    """What a valid token says: which trace the holder may rate, as whom, until when."""

    trace_id: str
    client_request_id: str
    user: str | None
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FeedbackTokens:
    """HMAC-SHA256 tokens scoped to one trace and expiring, as LangSmith's presigned feedback
    tokens are. The first secret signs; every one verifies (rotation: add the new one first)."""

    def __init__(self, secrets: Sequence[str], ttl_seconds: float) -> None:
        # Derived keys: a framework secret (Django's SECRET_KEY) is never used as is.
        self._keys = [hashlib.sha256(_CONTEXT + secret.encode()).digest() for secret in secrets]
        self._ttl = ttl_seconds

    def _sign(self, key: bytes, payload: str) -> str:
        return _b64(hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, trace_id: str, client_request_id: str, user: str | None, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self._ttl)
        body = {"t": trace_id, "r": client_request_id, "u": user, "e": expires}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(self._keys[0], payload)}"

    def verify(self, token: str | None, now: float | None = None) -> TokenClaims | None:
        """The claims of a genuine, unexpired token; None for anything else (never raises)."""
        if not token or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
            return None
        payload, signature = token.split(".")
        try:
            payload.encode("ascii")
        except UnicodeEncodeError:
            return None
        if not any(hmac.compare_digest(self._sign(key, payload), signature) for key in self._keys):
            return None
        try:
            body = json.loads(_unb64(payload))
            claims = TokenClaims(str(body["t"]), str(body["r"]), body["u"], int(body["e"]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if claims.user is not None and not isinstance(claims.user, str):
            return None
        if claims.expires < (time.time() if now is None else now):
            return None
        return claims


# --- rate limits ------------------------------------------------------------------------------------


class RateLimiter:
    """`rate` requests per `per` seconds for each client key (a token bucket), bounded memory:
    the least recently seen keys are forgotten past `max_clients` (they start full again)."""

    def __init__(self, rate: int, per: float = 60.0, max_clients: int = 10_000) -> None:
        self._rate = rate
        self._refill = rate / per
        self._max = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> float:
        """0 if this request may go ahead, else the seconds until it may (Retry-After)."""
        if self._rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, seen = self._buckets.pop(key, (float(self._rate), now))
            tokens = min(float(self._rate), tokens + (now - seen) * self._refill)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self._refill
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        return wait
