import os

import mlflow
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "chat-examples"))
application = get_wsgi_application()
