"""Django chat example settings: the middleware is one MIDDLEWARE line plus MLFLOW_CTX."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "chatsite.urls"
WSGI_APPLICATION = "chatsite.wsgi.application"
ASGI_APPLICATION = "chatsite.asgi.application"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "mlflow_ctx_mw.django.MlflowContextMiddleware",
]

# Optional: same keys as the FastAPI/Flask keyword options.
MLFLOW_CTX = {
    "header_tags": {"X-Client": "client"},
    "exclude_paths": ["/health"],
}
