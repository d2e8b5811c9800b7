"""Flask chat example: wrap `app.wsgi_app` once, write handlers as usual.

Run: MLFLOW_TRACKING_URI=http://127.0.0.1:5000 flask --app app run --port 8002
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
from flask import Flask, Response, jsonify, request

from mlflow_ctx_mw.wsgi import MlflowContextMiddleware

mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "chat-examples"))

app = Flask(__name__)
app.wsgi_app = MlflowContextMiddleware(app.wsgi_app, exclude_paths=["/health"])  # type: ignore[method-assign]


@mlflow.trace(span_type="LLM")
def fake_llm(message: str) -> str:
    time.sleep(0.02)
    if "fail" in message.lower():
        raise RuntimeError("the model is unavailable")
    return f"You said: {message}"


@app.post("/chat")
def chat() -> Response:
    message = (request.get_json(silent=True) or {}).get("message", "")
    return jsonify(answer=fake_llm(message))


@app.post("/chat/stream")
def chat_stream() -> Response:
    answer = fake_llm((request.get_json(silent=True) or {}).get("message", ""))

    def events() -> Iterator[str]:
        for word in answer.split():
            time.sleep(0.01)
            yield f"data: {word}\n\n"
        yield "event: done\ndata: \n\n"

    return Response(events(), mimetype="text/event-stream")


CHAT_PAGE = Path(__file__).resolve().parent.parent / "chat.html"


@app.get("/")
def page() -> Response:
    return Response(CHAT_PAGE.read_text(), mimetype="text/html")


@app.get("/health")
def health() -> Response:
    return jsonify(status="ok")
