"""Worker database connections: reused across tasks (CELERY_DB_REUSE_MAX reaches Celery's Django
fix-up), yet replaced between tasks when PostgreSQL dropped them (config/celery.py)."""

import psycopg
import pytest
from celery.fixups.django import DjangoWorkerFixup  # type: ignore[attr-defined]  # not in the stubs
from django.conf import settings
from django.db import OperationalError, connection

from config.celery import _database_hygiene, app


def test_the_fixup_reads_the_reuse_setting() -> None:
    # The fix-up reads the app's configuration; an environment variable alone is ignored.
    assert settings.CELERY_DB_REUSE_MAX == 1000
    assert DjangoWorkerFixup(app).db_reuse_max == 1000


def _backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def _terminate(pid: int) -> None:
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params.pop("prepare_threshold", None)
    with psycopg.connect(**params, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])


@pytest.mark.django_db(transaction=True)
def test_a_healthy_connection_survives_the_task_boundary() -> None:
    before = _backend_pid()
    _database_hygiene()
    _database_hygiene()
    assert _backend_pid() == before


@pytest.mark.django_db(transaction=True)
def test_a_connection_postgresql_dropped_is_replaced_between_tasks() -> None:
    dead = _backend_pid()
    _terminate(dead)
    with pytest.raises(OperationalError):
        _backend_pid()  # the task that meets the dead connection fails (and is retried)
    _database_hygiene()  # its task_postrun
    assert _backend_pid() != dead


@pytest.mark.django_db(transaction=True)
def test_without_the_hygiene_the_dead_connection_stays() -> None:
    # What the handler is for: Django does not reconnect by itself outside a request.
    dead = _backend_pid()
    _terminate(dead)
    with pytest.raises(OperationalError):
        _backend_pid()
    with pytest.raises(Exception):  # noqa: B017 - InterfaceError or OperationalError
        _backend_pid()
    _database_hygiene()
