"""Stands in for django.contrib.auth (no database here): "Authorization: Bearer <name>" logs in.

As Django's own, request.user is lazy and its loading is async-unsafe (it would read the session
from the database): touched from async code it raises SynchronousOnlyOperation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.utils.asyncio import async_unsafe
from django.utils.functional import SimpleLazyObject


class User:
    is_authenticated = True

    def __init__(self, name: str) -> None:
        self.name = name

    def get_username(self) -> str:
        return self.name


class Anonymous:
    is_authenticated = False


@async_unsafe
def load_user(request: Any) -> Any:
    value = request.headers.get("Authorization", "")
    return User(value[7:]) if value.startswith("Bearer ") else Anonymous()


class BearerAuthMiddleware:
    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        request.user = SimpleLazyObject(lambda: load_user(request))
        return self.get_response(request)
