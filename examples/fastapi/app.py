"""FastAPI chat example: the middleware is one line, the rest is an ordinary app.

Run: MLFLOW_TRACKING_URI=http://127.0.0.1:5000 uvicorn app:app --port 8001
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import mlflow
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel

from mlflow_ctx_mw.asgi import MlflowContextMiddleware

mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "chat-examples"))

app = FastAPI(title="mlflow-ctx-mw FastAPI example")
app.add_middleware(MlflowContextMiddleware, exclude_paths=["/health"])


class ChatIn(BaseModel):
    message: str


@mlflow.trace(span_type="LLM")
async def fake_llm(message: str) -> str:
    """Stands in for a model call: a short delay, then an echo."""
    await asyncio.sleep(0.02)
    if "fail" in message.lower():
        raise RuntimeError("the model is unavailable")
    return f"You said: {message}"


@app.post("/chat")
async def chat(body: ChatIn) -> dict[str, str]:
    if not body.message.strip():
        raise HTTPException(422, "empty message")
    return {"answer": await fake_llm(body.message)}


@app.post("/chat/stream")
async def chat_stream(body: ChatIn) -> StreamingResponse:
    answer = await fake_llm(body.message)

    async def events() -> AsyncIterator[str]:
        for word in answer.split():
            await asyncio.sleep(0.01)
            yield f"data: {word}\n\n"
        yield "event: done\ndata: \n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


CHAT_PAGE = Path(__file__).resolve().parent.parent / "chat.html"


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    return CHAT_PAGE.read_text()


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
