"""Stands in for django.contrib.auth (no database here): "Authorization: Bearer <name>" logs in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class User:
    is_authenticated = True

    def __init__(self, name: str) -> None:
        self.name = name

    def get_username(self) -> str:
        return self.name


class Anonymous:
    is_authenticated = False


class BearerAuthMiddleware:
    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        value = request.headers.get("Authorization", "")
        request.user = User(value[7:]) if value.startswith("Bearer ") else Anonymous()
        return self.get_response(request)
