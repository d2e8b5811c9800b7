"""A minimal Django project for the integration tests: the middleware is one MIDDLEWARE line.
MLFLOW_CTX_OPTIONS (JSON) adds options, as for tests/served.py's apps."""

import json
import os

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "djproj.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "djproj.auth.BearerAuthMiddleware",  # before ours, as AuthenticationMiddleware would be
    "mlflow_ctx_mw.django.MlflowContextMiddleware",
]
from apps import OPTIONS  # noqa: E402

# The project authenticates (a bearer token names the user), so by default the user header would
# name nobody; its clients (the tests) name users by header, as an app behind a gateway that
# sets it would. Tests of the default run with trust_user_header=None (conftest.serve).
EXTRA = json.loads(os.environ.get("MLFLOW_CTX_OPTIONS") or "{}")
MLFLOW_CTX = {**OPTIONS, "trust_user_header": True, **EXTRA}
LOGGING_CONFIG = None
