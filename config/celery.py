"""The Celery application: the producer side (web) and the consumers (workers) share it."""

import os
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("merchant")
# Every Celery setting lives in Django settings under the CELERY_ prefix.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def _database_hygiene(task: Any = None, **_: Any) -> None:
    """Between tasks, what Django does between requests: drop this thread's connections that
    failed (a PostgreSQL restart) or outlived DATABASE_CONN_MAX_AGE. CELERY_DB_REUSE_MAX keeps
    Celery's fix-up from closing every connection after every task, and the fix-up alone never
    notices a broken one: without this a worker thread would keep failing on a dead
    connection. Costs no round trip (health checks are off by default)."""
    if task is not None and getattr(task.request, "is_eager", False):
        return  # eager runs (tests) happen inside the caller's transaction
    from django.db import close_old_connections

    close_old_connections()


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    """Each worker serves its own metrics on METRICS_WORKER_PORT (config/metrics.py)."""
    from config.metrics import worker_metrics_server_start

    worker_metrics_server_start()
