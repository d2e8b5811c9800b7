"""MLflow trace context for every HTTP request: ASGI, WSGI and Django middleware."""

from mlflow_ctx_mw.config import Options, OptionsError
from mlflow_ctx_mw.context import RequestInfo, TraceContextFilter, current_request, outgoing_headers
from mlflow_ctx_mw.destination import TracingStatus, tracing_status
from mlflow_ctx_mw.export import ExportStats, export_stats
from mlflow_ctx_mw.view import RequestView

__all__ = [
    "ExportStats",
    "Options",
    "OptionsError",
    "RequestInfo",
    "RequestView",
    "TraceContextFilter",
    "TracingStatus",
    "current_request",
    "export_stats",
    "outgoing_headers",
    "tracing_status",
]
__version__ = "0.2.0"
