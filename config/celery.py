"""The Celery application: the producer side (web) and the consumers (workers) share it."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# Celery's Django fix-up closes the database connection after every task unless told to reuse
# it; a new PostgreSQL connection per task costs ~4x the throughput (notes/measured-baseline).
os.environ.setdefault("CELERY_DB_REUSE_MAX", "1000")

app = Celery("merchant")
# Every Celery setting lives in Django settings under the CELERY_ prefix.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
