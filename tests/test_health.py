"""GET /healthz and /readyz as a load balancer sees them: with every dependency up, and with
each of PostgreSQL, Redis, the broker down (a closed port) or stalled (a port that accepts and
never answers), and with a migration unapplied (its row really gone from django_migrations)."""

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from django.db import connection
from django.db.migrations.loader import MigrationLoader
from rest_framework.test import APIClient

from config import health
from tests import processes

# The checks open their own connections (on their own threads): the test database must exist.
pytestmark = pytest.mark.django_db

ANSWER_SECONDS = 3.0


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """No migration result cached by an earlier test, no check still running from one."""
    monkeypatch.setattr(health, "_migrations_applied", False)
    monkeypatch.setattr(health, "_running", {})


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def silent_port() -> Iterator[int]:
    """A port whose kernel completes the TCP handshake, behind which nobody ever answers: a
    stalled server. Closing it resets the connections, which ends the stuck checks."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


def readyz() -> tuple[Any, float]:
    started = time.monotonic()
    response = APIClient().get("/readyz")
    return response, time.monotonic() - started


def not_ready(response: Any, elapsed: float) -> dict[str, Any]:
    assert elapsed < ANSWER_SECONDS, elapsed
    assert response.status_code == 503, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response["Cache-Control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert body["type"] == "/problems/not-ready"
    assert body["status"] == 503
    assert set(body["checks"]) == {"postgresql", "migrations", "redis", "broker"}
    for name in body["failed"]:
        assert name in body["detail"]
    return body


@pytest.fixture
def database_port(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Points new connections to the default database at another port. The test's own
    connection is already open and keeps working; the checks' new ones do not."""

    def point(port: int) -> None:
        # The settings dict every connection of the alias is made from, in every thread.
        monkeypatch.setitem(connection.settings_dict, "PORT", str(port))

    assert connection.connection is not None
    return point


def test_healthz_is_ok_without_any_io(settings: Any, database_port: Any) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    settings.CELERY_BROKER_URL = settings.REDIS_URL
    database_port(closed_port())
    started = time.monotonic()
    response = APIClient().get("/healthz")  # no token
    assert time.monotonic() - started < 0.5
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    assert APIClient().head("/healthz").status_code == 200


def test_readyz_is_ready_with_the_real_services() -> None:
    response, elapsed = readyz()
    assert elapsed < ANSWER_SECONDS, elapsed
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    assert response.json() == {
        "status": "ready",
        "checks": {"postgresql": "ok", "migrations": "ok", "redis": "ok", "broker": "ok"},
    }


def test_readyz_names_postgresql_when_it_is_unreachable(database_port: Any) -> None:
    database_port(closed_port())
    body = not_ready(*readyz())
    assert body["failed"] == ["postgresql"]
    assert body["checks"]["postgresql"] == "error: OperationalError"
    assert body["checks"]["migrations"] == "not checked"
    assert body["checks"]["redis"] == body["checks"]["broker"] == "ok"
    assert "5432" not in str(body) and "127.0.0.1" not in str(body)  # no internals disclosed


def test_readyz_names_postgresql_when_it_is_stalled(database_port: Any) -> None:
    with silent_port() as port:
        database_port(port)
        body = not_ready(*readyz())
        assert body["failed"] == ["postgresql"]
        assert body["checks"]["postgresql"] == "timeout"
        # The next probe waits on the same stuck check instead of starting another one.
        stuck = health._running["postgresql"]
        body = not_ready(*readyz())
        assert body["checks"]["postgresql"] in {"timeout", "error: OperationalError"}
        assert health._running["postgresql"] is stuck


def test_readyz_names_redis_when_it_is_unreachable(settings: Any) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    body = not_ready(*readyz())
    assert body["failed"] == ["redis"]
    assert body["checks"]["redis"] == "error: ConnectionError"


def test_readyz_names_redis_when_it_is_stalled(settings: Any) -> None:
    with silent_port() as port:
        settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
        body = not_ready(*readyz())
    assert body["failed"] == ["redis"]
    assert body["checks"]["redis"] in {"timeout", "error: TimeoutError"}


def test_readyz_names_the_broker_when_it_is_unreachable(settings: Any) -> None:
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{closed_port()}/0"
    body = not_ready(*readyz())
    assert body["failed"] == ["broker"]
    assert body["checks"]["broker"].startswith("error: ")
    assert body["checks"]["redis"] == "ok"


def test_readyz_names_the_broker_when_it_is_stalled(settings: Any) -> None:
    with silent_port() as port:
        settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{port}/0"
        body = not_ready(*readyz())
    assert body["failed"] == ["broker"]


@contextmanager
def migration_unapplied() -> Iterator[str]:
    """The last migration of `linking` recorded as not applied (its django_migrations row
    deleted, committed, so that the checks' own connections see it), restored afterwards."""
    leaf = max(n for n in MigrationLoader(None).graph.leaf_nodes() if n[0] == "linking")
    with psycopg.connect(processes.test_database_url(), autocommit=True) as admin:
        row = admin.execute(
            "DELETE FROM django_migrations WHERE app = %s AND name = %s RETURNING applied",
            leaf,
        ).fetchone()
        assert row is not None
        try:
            yield f"{leaf[0]}.{leaf[1]}"
        finally:
            admin.execute(
                "INSERT INTO django_migrations (app, name, applied) VALUES (%s, %s, %s)",
                (*leaf, row[0]),
            )


def test_readyz_names_an_unapplied_migration() -> None:
    with migration_unapplied() as name:
        body = not_ready(*readyz())
        assert body["failed"] == ["migrations"]
        assert body["checks"]["migrations"] == f"unapplied: {name}"
        assert body["checks"]["postgresql"] == "ok"
    response, _ = readyz()
    assert response.status_code == 200, response.content


def test_applied_migrations_are_checked_once_per_process() -> None:
    assert readyz()[0].status_code == 200
    with migration_unapplied():
        # Migrations do not un-apply in a running deployment: the result is not read again.
        assert readyz()[0].status_code == 200


def test_probes_are_neither_authenticated_nor_throttled(settings: Any) -> None:
    settings.RATE_LIMIT_READ = "1/min"
    client = APIClient()
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_other_methods_get_a_problem() -> None:
    response = APIClient().post("/readyz")
    assert response.status_code == 405
    assert response["Content-Type"] == "application/problem+json"
    assert response["Allow"] == "GET, HEAD"
    assert response.json()["type"] == "/problems/method-not-allowed"


def test_probes_are_not_in_the_api_schema() -> None:
    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    paths = response.json()["paths"]
    assert "/healthz" not in paths and "/readyz" not in paths
    # A client can dereference the new problem type like the others.
    assert APIClient().get("/problems/not-ready").json()["status"] == 503


def test_plain_http_probes_are_not_redirected(settings: Any) -> None:
    # A probe speaking plain http to the instance must see the real answer, not a 301 that
    # most probes would count as healthy; everything else is still redirected to https.
    settings.SECURE_SSL_REDIRECT = True
    client = APIClient()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/link/status/x").status_code == 301
