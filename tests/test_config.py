"""Options are validated when the middleware is built, not at the first request."""

from __future__ import annotations

import pytest

from mlflow_ctx_mw import asgi, wsgi
from mlflow_ctx_mw.config import DEFAULT_ENV_METADATA, Options, OptionsError


async def _app(scope, receive, send):  # type: ignore[no-untyped-def]
    raise AssertionError("not called")


def test_defaults() -> None:
    options = Options()
    assert options.request_id_header == "X-Request-ID"
    assert options.trace_id_header == "X-Trace-ID"
    assert dict(options.env_metadata) == dict(DEFAULT_ENV_METADATA)


def test_unknown_key_names_the_key_and_the_valid_ones() -> None:
    with pytest.raises(OptionsError, match=r"unknown option\(s\) sesion_header; valid: .*session_id_header"):
        Options.build({"sesion_header": "X-S"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trace_id_header": "X Trace"}, "trace_id_header: 'X Trace' is not a valid HTTP header name"),
        ({"user_id_header": ""}, "user_id_header"),
        ({"user_id_header": 5}, "user_id_header"),
        ({"request_id_header": "Authorization"}, "carries credentials"),
        ({"header_metadata": {"Cookie": "c"}}, "carries credentials"),
        ({"header_tags": {"x-api-key": "k"}}, "carries credentials"),
        ({"header_metadata": {"X-Tenant": ""}}, "non-empty strings"),
        ({"header_tags": ["X-Tenant"]}, "expected a mapping"),
        ({"static_metadata": {"k": 1}}, "non-empty strings"),
        ({"echo_request_id": "yes"}, "expected a bool"),
        ({"request_hook": "not callable"}, "expected a callable"),
        ({"experiment_id": ""}, "experiment_id"),
        ({"spool": "yes"}, "spool: expected a bool"),
        ({"spool_dir": ""}, "spool_dir"),
        ({"spool_max_bytes": 1000}, "spool_max_bytes: expected an int of at least 1 MiB"),
        ({"spool_max_age_seconds": 1}, "spool_max_age_seconds: expected 60 to"),
        ({"spool_replay_per_second": 0}, "spool_replay_per_second"),
        ({"spool_fsync": 1}, "spool_fsync: expected a bool"),
    ],
)
def test_bad_values_fail_at_start_up(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        Options.build(**kwargs)
    with pytest.raises(OptionsError, match=message):
        asgi.MlflowContextMiddleware(_app, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match=message):
        wsgi.MlflowContextMiddleware(lambda e, s: [], **kwargs)  # type: ignore[arg-type]


def test_env_read_once_and_only_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in DEFAULT_ENV_METADATA:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("APP_VERSION", "9.9")
    monkeypatch.setenv("REGION", "")
    options = Options()
    monkeypatch.setenv("APP_VERSION", "changed later")
    assert dict(options.env_values) == {"app_version": "9.9"}


def test_custom_env_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_SHA", "abc123")
    assert dict(Options(env_metadata={"GIT_SHA": "git_sha"}).env_values) == {"git_sha": "abc123"}


def test_build_merges_options_object_and_kwargs() -> None:
    base = Options(user_id_header="X-User")
    merged = Options.build(base, session_id_header="X-Conversation")
    assert (merged.user_id_header, merged.session_id_header) == ("X-User", "X-Conversation")
    assert Options.build(base) is base


def test_header_keys_are_normalised_to_lower_case() -> None:
    assert dict(Options(header_tags={"X-Tenant": "tenant"}).header_tags) == {"x-tenant": "tenant"}


def test_options_are_immutable() -> None:
    options = Options()
    with pytest.raises(AttributeError):
        options.trace_id_header = "X-Other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        options.static_tags["k"] = "v"  # type: ignore[index]
