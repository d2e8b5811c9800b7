from __future__ import annotations

import asyncio
import time

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse

from apps import SLOW_CHUNKS, STREAM_CHUNKS, STREAM_DELAY, async_chunks, chunk, lookup, sync_chunks


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


def slow_stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(sync_chunks(SLOW_CHUNKS), content_type="text/event-stream")


def aslow_stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(async_chunks(SLOW_CHUNKS), content_type="text/event-stream")


def broken_stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(sync_chunks(2, fail=True), content_type="text/event-stream")


def abroken_stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(async_chunks(2, fail=True), content_type="text/event-stream")
