from __future__ import annotations

import asyncio
import time

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse

from apps import STREAM_CHUNKS, STREAM_DELAY, chunk, lookup


async def item(request: HttpRequest, item_id: int) -> JsonResponse:
    return JsonResponse({"value": lookup(item_id)})


def sync_item(request: HttpRequest, item_id: int) -> JsonResponse:
    return JsonResponse({"value": lookup(item_id)})


def boom(request: HttpRequest) -> JsonResponse:
    raise RuntimeError("boom")


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def body():  # type: ignore[no-untyped-def]
        for i in range(STREAM_CHUNKS):
            time.sleep(STREAM_DELAY)
            yield chunk(i)

    return StreamingHttpResponse(body(), content_type="text/event-stream")


def astream(request: HttpRequest) -> StreamingHttpResponse:
    async def body():  # type: ignore[no-untyped-def]
        for i in range(STREAM_CHUNKS):
            await asyncio.sleep(STREAM_DELAY)
            yield await sync_to_async(chunk)(i)

    return StreamingHttpResponse(body(), content_type="text/event-stream")
