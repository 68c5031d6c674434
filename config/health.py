"""Health endpoints for the load balancer (docs/operations.md "Health checks and logs").

`GET /healthz`: the process is alive and serving; no I/O. `GET /readyz`: it can do its work:
PostgreSQL answers, every migration is applied, Redis answers and the Celery broker is
reachable; 503 problem+json naming what failed otherwise.

Plain Django views, not DRF: no authentication, throttle or content negotiation can refuse a
probe, and they are not part of the API's OpenAPI document.

Each check runs on a thread of its own under one deadline, so /readyz answers within about
CHECK_TIMEOUT_SECONDS even when a dependency is stalled (a black-holed host, a stopped server);
a check still running then counts as a `timeout`. A check that outlives its deadline is not
started again by the next probe, which waits on the same run: a stalled dependency holds one
thread, not one per probe.

Hand-written, not django-health-check: its view waits for every check to return (no deadline:
a black-holed dependency holds the probe for its socket timeout), starts new threads per probe,
answers 500 with its own JSON or HTML rather than 503 problem+json, and its database check
writes rows into a table of its own migration.
"""

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from functools import lru_cache

import redis
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from redis.backoff import NoBackoff
from redis.retry import Retry

from merchant.problems import PROBLEM_CONTENT_TYPE, problem_body

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 1.5
# Socket timeouts of the Redis and broker checks: below the deadline, so a refused or stalled
# connection usually reports its own error rather than a bare timeout.
_SOCKET_TIMEOUT_SECONDS = 1.0

OK = "ok"
TIMEOUT = "timeout"
NOT_CHECKED = "not checked"

_METHODS = ("GET", "HEAD")
_NO_STORE = {"Cache-Control": "no-store"}
_ALIVE = b'{"status":"ok"}'

Results = dict[str, str]


# --- the checks --------------------------------------------------------------------------------

# Migrations do not un-apply: once the plan is empty, later probes skip the (costly) loader.
_migrations_applied = False


def _database() -> Results:
    """`SELECT 1` on the default database, then the migration plan on the same connection.

    This thread's own connection (Django's are per thread), closed afterwards: a probe
    opens one connection, and a stalled check leaves nothing behind in a request thread."""
    global _migrations_applied
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        if _migrations_applied:
            return {"postgresql": OK, "migrations": OK}
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        if plan:
            names = [f"{migration.app_label}.{migration.name}" for migration, _ in plan]
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            return {"postgresql": OK, "migrations": f"unapplied: {', '.join(names[:3])}{more}"}
        _migrations_applied = True
        return {"postgresql": OK, "migrations": OK}
    finally:
        connection.close()


@lru_cache(maxsize=4)
def _redis_client(url: str) -> redis.Redis:
    # Made once per URL: its connection pool is reused by later probes. No retries: a probe
    # reports what it saw, and the next probe is the retry.
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=_SOCKET_TIMEOUT_SECONDS,
        socket_timeout=_SOCKET_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )


def _redis() -> Results:
    _redis_client(settings.REDIS_URL).ping()
    return {"redis": OK}


def _broker() -> Results:
    """Connect to the broker as the producer does (for Redis, kombu PINGs it), once."""
    from config.celery import app

    with app.connection_for_write(
        settings.CELERY_BROKER_URL, connect_timeout=_SOCKET_TIMEOUT_SECONDS
    ) as connection:
        connection.ensure_connection(max_retries=0)
    return {"broker": OK}


@dataclass(frozen=True)
class _Check:
    names: tuple[str, ...]  # the results it gives; the first is the dependency it reaches
    run: Callable[[], Results]

    def failed(self, state: str) -> Results:
        return {self.names[0]: state} | dict.fromkeys(self.names[1:], NOT_CHECKED)


CHECKS = (
    _Check(("postgresql", "migrations"), _database),
    _Check(("redis",), _redis),
    _Check(("broker",), _broker),
)


# --- running them ------------------------------------------------------------------------------

_running: dict[str, Future[Results]] = {}
_running_lock = threading.Lock()


def _start(check: _Check) -> Future[Results]:
    with _running_lock:
        future = _running.get(check.names[0])
        if future is not None and not future.done():
            return future
        future = Future()
        _running[check.names[0]] = future
    threading.Thread(
        target=_run, args=(check, future), name=f"readyz-{check.names[0]}", daemon=True
    ).start()
    return future


def _run(check: _Check, future: Future[Results]) -> None:
    try:
        results = check.run()
    except Exception as exc:
        # The class name is all the (unauthenticated) answer says; the message, with hosts and
        # ports, is for the operators.
        logger.warning("readiness: %s failed: %s: %s", check.names[0], type(exc).__name__, exc)
        results = check.failed(f"error: {type(exc).__name__}")
    future.set_result(results)


def readiness(timeout: float = CHECK_TIMEOUT_SECONDS) -> Results:
    """Each dependency's state: `ok`, `timeout`, `error: <exception class>`, `not checked`, or
    for migrations `unapplied: <app.migration>, ...`."""
    futures = [(check, _start(check)) for check in CHECKS]
    wait([future for _, future in futures], timeout=timeout)
    results: Results = {}
    for check, future in futures:
        results.update(future.result() if future.done() else check.failed(TIMEOUT))
    return results


# --- the views ---------------------------------------------------------------------------------


def _method_not_allowed(request: HttpRequest) -> JsonResponse:
    body = problem_body("method-not-allowed", instance=request.path)
    return JsonResponse(
        body,
        status=body["status"],
        content_type=PROBLEM_CONTENT_TYPE,
        headers={"Allow": ", ".join(_METHODS), **_NO_STORE},
    )


@csrf_exempt  # read-only; other methods get a 405 problem, not a CSRF page
def healthz(request: HttpRequest) -> HttpResponse:
    if request.method not in _METHODS:
        return _method_not_allowed(request)
    return HttpResponse(_ALIVE, content_type="application/json", headers=_NO_STORE)


@csrf_exempt
def readyz(request: HttpRequest) -> HttpResponse:
    if request.method not in _METHODS:
        return _method_not_allowed(request)
    checks = readiness()
    failed = [name for name, state in checks.items() if state not in (OK, NOT_CHECKED)]
    if not failed:
        return JsonResponse({"status": "ready", "checks": checks}, headers=_NO_STORE)
    logger.warning("not ready: %s", ", ".join(f"{name} {checks[name]}" for name in failed))
    body = problem_body(
        "not-ready",
        detail=f"Not ready: {', '.join(failed)}.",
        instance=request.path,
        failed=failed,
        checks=checks,
    )
    return JsonResponse(
        body, status=body["status"], content_type=PROBLEM_CONTENT_TYPE, headers=_NO_STORE
    )
