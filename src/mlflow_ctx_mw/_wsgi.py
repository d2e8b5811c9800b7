"""WSGI plumbing for the middleware in wsgi.py: the environ as a RequestView, the Flask route, and
the body wrapper that keeps the span current per chunk and ends it when the server closes it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

from werkzeug.datastructures import EnvironHeaders

from mlflow_ctx_mw.span import RequestSpan
from mlflow_ctx_mw.view import RequestView

Environ = dict[str, Any]


class ClosingBody:
    """Passes the body through chunk by chunk; ends the span on close() (PEP 3333 guarantees it)."""

    __slots__ = ("_body", "_chunks", "_rs")

    def __init__(self, body: Iterable[bytes], rs: RequestSpan) -> None:
        self._body = body
        self._chunks: Iterator[bytes] | None = None
        self._rs = rs

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._chunks is None:
            self._chunks = iter(self._body)
        return self._rs.next_chunk(self._chunks)

    def close(self) -> None:
        try:
            if (close := getattr(self._body, "close", None)) is not None:
                close()
        finally:
            self._rs.client_gone()  # after the last chunk the span has ended already


def is_file_wrapper(environ: Environ, body: object) -> bool:
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(body, wrapper)


def view(environ: Environ) -> RequestView:
    return RequestView(
        method=environ.get("REQUEST_METHOD", "GET"),
        path=environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
        query_string=environ.get("QUERY_STRING", ""),
        headers=cast("Mapping[str, str]", EnvironHeaders(environ)),  # a case-insensitive lookup
        native=environ,
        client=environ.get("REMOTE_ADDR"),
    )


def route(environ: Environ) -> str | None:
    """Flask/werkzeug's matched rule, when the app parsed a request of this environ."""
    request = environ.get("werkzeug.request")
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    return rule if isinstance(rule, str) else None
