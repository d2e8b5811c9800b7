from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import mlflow
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt


@mlflow.trace(span_type="LLM")
async def fake_llm(message: str) -> str:
    await asyncio.sleep(0.02)
    if "fail" in message.lower():
        raise RuntimeError("the model is unavailable")
    return f"You said: {message}"


def _message(request: HttpRequest) -> str:
    try:
        return str(json.loads(request.body or b"{}").get("message", ""))
    except (ValueError, AttributeError):
        return ""


@csrf_exempt
async def chat(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"answer": await fake_llm(_message(request))})


@csrf_exempt
async def chat_stream(request: HttpRequest) -> HttpResponse:
    answer = await fake_llm(_message(request))

    async def events() -> AsyncIterator[str]:
        for word in answer.split():
            await asyncio.sleep(0.01)
            yield f"data: {word}\n\n"
        yield "event: done\ndata: \n\n"

    return StreamingHttpResponse(events(), content_type="text/event-stream")


CHAT_PAGE = Path(__file__).resolve().parents[2] / "chat.html"


def page(request: HttpRequest) -> HttpResponse:
    return HttpResponse(CHAT_PAGE.read_text(), content_type="text/html")


def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})
