"""Test apps for real server processes (uvicorn --factory / gunicorn), configured by env:
MLFLOW_EXPERIMENT_NAME (set in code with mlflow.set_experiment, unless MLFLOW_CTX_CONFIG=env:
then only the environment names it), MLFLOW_CTX_EXPERIMENT_ID (export there, no network call at
start-up), MLFLOW_CTX_BARE=1 (no middleware), MLFLOW_CTX_OPTIONS (JSON: more middleware options)."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlflow

import apps

# A test that finds a server hung sends SIGUSR1: every thread's stack goes to the server's log.
faulthandler.register(signal.SIGUSR1, all_threads=True)

EXTRA = (
    {"experiment_id": os.environ["MLFLOW_CTX_EXPERIMENT_ID"]}
    if os.environ.get("MLFLOW_CTX_EXPERIMENT_ID")
    else {}
)
OPTIONS = {**EXTRA, **json.loads(os.environ.get("MLFLOW_CTX_OPTIONS") or "{}")}
if apps.BARE:
    mlflow.tracing.disable()  # the baseline: the same app, not traced at all
elif not EXTRA and os.environ.get("MLFLOW_EXPERIMENT_NAME") and os.environ.get("MLFLOW_CTX_CONFIG") != "env":
    mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])


def fastapi() -> object:
    return apps.fastapi_app(**OPTIONS)


def flask() -> object:
    return apps.flask_app(**OPTIONS)


def django_wsgi() -> object:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproj.settings")
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def django_asgi() -> object:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproj.settings")
    from django.core.asgi import get_asgi_application

    return get_asgi_application()
