"""Chat traffic through the real middleware, for the analytics bench and tests: users with
multi-turn sessions, several app versions, deployments and regions, three routes, errors, LLM
token usage and cost, and thumbs up/down through the feedback endpoint. Each version is its own
app (the middleware reads APP_VERSION and friends once, as a deployed process does).

What was sent is returned, so a test can count what each rollup must say by itself.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import mlflow
from mlflow.entities import SpanType
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mlflow_ctx_mw import _exporter
from mlflow_ctx_mw.asgi import MlflowContextMiddleware

#: (app_version, deployment_id, region, error rate, positive share, base latency in s)
BUILDS = (
    ("1.3.0", "deploy-a", "eu-west-1", 0.08, 0.55, 0.012),
    ("1.4.0", "deploy-b", "eu-west-1", 0.02, 0.80, 0.004),
    ("1.4.0", "deploy-c", "us-east-1", 0.02, 0.80, 0.004),
)
ROUTES = ("/chat", "/search", "/summarize")


@dataclass
class Sent:
    """One request as the client saw it."""

    trace_id: str
    request_id: str
    user: str
    session: str
    version: str
    deployment: str
    region: str
    route: str
    status: int
    tokens: int
    rating: bool | None = None


@dataclass
class Traffic:
    sent: list[Sent] = field(default_factory=list)


def _app() -> Starlette:
    async def answer(request: Request) -> JSONResponse:
        fail, delay, tokens = (float(request.headers[h]) for h in ("x-fail", "x-delay", "x-tokens"))
        with mlflow.start_span("llm", span_type=SpanType.CHAT_MODEL) as span:
            await asyncio.sleep(delay)
            span.set_attribute("mlflow.chat.tokenUsage", {
                "input_tokens": int(tokens * 0.75), "output_tokens": int(tokens) - int(tokens * 0.75),
                "total_tokens": int(tokens),
            })  # fmt: skip
            span.set_attribute("mlflow.llm.cost", {"input_cost": tokens * 1e-6, "output_cost": tokens * 2e-6,
                                                   "total_cost": tokens * 3e-6})  # fmt: skip
        if fail:
            return JSONResponse({"error": "model overloaded"}, status_code=500)
        return JSONResponse({"answer": "ok"})

    return Starlette(routes=[Route(path, answer, methods=["POST"]) for path in ROUTES])


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def apps() -> list[MlflowContextMiddleware]:
    """One middleware-wrapped app per build, each with its own environment metadata."""
    built = []
    for version, deployment, region, *_ in BUILDS:
        with _environ(APP_VERSION=version, DEPLOYMENT_ID=deployment, REGION=region):
            built.append(MlflowContextMiddleware(_app(), feedback_rate_limit=0, feedback_wait_seconds=120.0))
    return built


async def drive(traces: int, *, users: int = 50, seed: int = 7, concurrency: int = 16,
                tag: str = "seed") -> Traffic:  # fmt: skip
    """`traces` requests; about a quarter get a thumbs up or down. Paced by MLflow's own export
    queue so none is dropped whatever the server's ingest rate."""
    rng = random.Random(seed)
    builds = list(zip(BUILDS, apps(), strict=True))
    traffic = Traffic()
    plan = []
    for i in range(traces):
        user = f"{tag}-u{rng.randrange(users):03d}"
        (version, deployment, region, error_rate, positive, latency), app = builds[rng.randrange(len(builds))]
        session = f"{user}-s{rng.randrange(4)}-{version}"
        plan.append((i, user, session, version, deployment, region, error_rate, positive, latency, app))
    queue: asyncio.Queue[tuple] = asyncio.Queue()  # type: ignore[type-arg]
    for item in plan:
        queue.put_nowait(item)

    async def worker() -> None:
        clients = {id(app): httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
                   for _, app in builds}  # fmt: skip
        try:
            while not queue.empty():
                i, user, session, version, deployment, region, error_rate, positive, latency, app = (
                    queue.get_nowait()
                )
                while _exporter.backlog() > 0.5:
                    await asyncio.sleep(0.05)
                route = ROUTES[rng.randrange(len(ROUTES))]
                fail = rng.random() < error_rate
                tokens = rng.randrange(50, 2000)
                delay = latency * (1 + 3 * rng.random()) * (3 if route == "/summarize" else 1)
                request_id = f"{tag}-{i}"
                client = clients[id(app)]
                response = await client.post(route, headers={
                    "X-Request-ID": request_id, "X-User-ID": user, "X-Session-ID": session,
                    "X-Fail": str(int(fail)), "X-Delay": f"{delay:.4f}", "X-Tokens": str(tokens),
                })  # fmt: skip
                sent = Sent(response.headers["x-trace-id"], request_id, user, session, version, deployment,
                            region, route, response.status_code, tokens)  # fmt: skip
                if rng.random() < 0.25:
                    sent.rating = rng.random() < positive
                    for _ in range(60):  # 503 "busy": the delivery queue is full; a client retries
                        reply = await client.post(
                            "/mlflow/feedback", json={"trace_id": sent.trace_id, "value": sent.rating},
                            headers={"X-Feedback-Token": response.headers["x-feedback-token"]},
                        )  # fmt: skip
                        if reply.status_code != 503:
                            break
                        await asyncio.sleep(1.0)
                    assert reply.status_code in (200, 201, 202), reply.text
                traffic.sent.append(sent)
        finally:
            for client in clients.values():
                await client.aclose()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return traffic


def main() -> None:
    """`python tests/traffic.py N USERS TAG SEED`: drive N requests into the experiment the
    environment names, wait until every trace and rating is handed to MLflow, print what was sent
    (JSON lines). A process of its own, so its traces have an experiment to themselves."""
    import dataclasses
    import json
    import sys
    import time

    from mlflow_ctx_mw import export_stats

    traces, users, tag, seed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    made = asyncio.run(drive(traces, users=users, concurrency=4, tag=tag, seed=seed))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stats = export_stats()
        if (
            stats.feedback_delivered + stats.feedback_refused + stats.feedback_dropped
            >= stats.feedback_accepted
        ):
            break
        time.sleep(0.2)
    mlflow.flush_trace_async_logging()
    for sent in made.sent:
        print(json.dumps(dataclasses.asdict(sent)))


if __name__ == "__main__":
    main()
