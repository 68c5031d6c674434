"""The Celery application: the producer side (web) and the consumers (workers) share it."""

import os
import threading
from typing import Any

from celery import Celery, bootsteps
from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutting_down

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


@worker_shutting_down.connect
def _hand_back_on_shutdown(how: str = "", **_: Any) -> None:
    """A warm shutdown (SIGTERM: a deploy, a scale-down): this process claims no new batch, and
    what its searches in flight do not finish within WORKER_SHUTDOWN_GRACE_SECONDS is handed
    back (workflows/claims.py). Only the process that runs the tasks hears it: the threads pool
    (ours) and solo; under prefork the children's claims lapse after a lease instead. A cold
    shutdown ends everything at once: the leases cover it."""
    if how == "Warm":
        from workflows.claims import claims_shutdown_begin

        claims_shutdown_begin()


class _DispatcherStep(bootsteps.StartStopStep):
    """Each worker runs a dispatcher on a thread (workflows/dispatcher.py): the queue messages of
    accepted workflows are published wherever workers run, with nothing else to deploy, and a
    lock keeps exactly one of them publishing."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.dispatcher: Any = None
        self.thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        from workflows.dispatcher import Dispatcher

        self.dispatcher = Dispatcher()
        self.thread = threading.Thread(target=self.dispatcher.run, name="dispatcher", daemon=True)
        self.thread.start()

    def stop(self, parent: Any) -> None:
        if self.dispatcher is not None and self.thread is not None:
            self.dispatcher.stop()
            self.thread.join(timeout=self.dispatcher.poll_seconds + 5)


app.steps["worker"].add(_DispatcherStep)
