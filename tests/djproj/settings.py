"""A minimal Django project for the integration tests: the middleware is one MIDDLEWARE line."""

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

MLFLOW_CTX = OPTIONS
LOGGING_CONFIG = None
