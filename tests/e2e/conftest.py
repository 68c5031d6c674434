"""The real stack for end-to-end tests: a Celery worker and beat (processes), the FHIR stand-in
and a webhook receiver (threads of this process), all on 127.0.0.1, against the test database
and the test Redis database. Started once for this package and stopped by pid afterwards."""

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import requests

from standin.receiver import ReceiverServer, make_receiver
from standin.server import make_server
from tests.processes import (
    celery_beat_args,
    celery_worker_args,
    child_env,
    running,
    serving,
    wait_for_text,
)

# Short, documented settings so that retries and sweeps take seconds, not minutes.
E2E_SETTINGS = {
    "WEBHOOK_RETRY_SCHEDULE": "1,1,1",
    "WEBHOOK_TIMEOUT_SECONDS": "2",
    "WEBHOOK_DISPATCH_INTERVAL_SECONDS": "1",
    "INTERNAL_SEARCH_READ_TIMEOUT": "1",
    "INTERNAL_SEARCH_CONNECT_TIMEOUT": "1",
    "RETRY_BACKOFF_BASE_SECONDS": "0.2",
    "RETRY_BACKOFF_MAX_SECONDS": "1",
    "WORKFLOW_MAX_ATTEMPTS": "3",
    # The relations of config/setting_rules.py hold: heartbeat x 3 <= lease, search < lease.
    "WORKFLOW_HEARTBEAT_SECONDS": "1",
    "WORKFLOW_CLAIM_LEASE_SECONDS": "4",
    "WORKER_SHUTDOWN_GRACE_SECONDS": "2",
    "RECONCILE_INTERVAL_SECONDS": "1",
    "RECONCILE_STALE_AFTER_SECONDS": "5",
    "CELERY_TASK_SOFT_TIME_LIMIT": "5",
    "CELERY_TASK_TIME_LIMIT": "10",
    "CELERY_VISIBILITY_TIMEOUT": "60",
}


@pytest.fixture(scope="package")
def stack(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("e2e")
    standin = make_server("127.0.0.1", 0)
    receiver = make_receiver()
    with ExitStack() as stack:
        for server in (standin, receiver):
            stack.enter_context(serving(server))
        with django_db_blocker.unblock():
            env = child_env(INTERNAL_SEARCH_URL=standin.base_url, LOG_LEVEL="INFO", **E2E_SETTINGS)
        worker_log = logs / "worker.log"
        beat_log = logs / "beat.log"
        stack.enter_context(running(celery_worker_args(), env=env, log=worker_log.open("wb")))
        stack.enter_context(
            running(celery_beat_args(logs / "beat-schedule"), env=env, log=beat_log.open("wb"))
        )
        wait_for_text(worker_log, "ready.")
        wait_for_text(beat_log, "beat: Starting")
        yield {
            "standin": standin,
            "receiver": receiver,
            "worker_log": worker_log,
            "beat_log": beat_log,
        }


@pytest.fixture
def standin(stack: dict[str, Any]) -> Iterator[Any]:
    server = stack["standin"]
    requests.post(f"{control_root(server)}/_control/reset", timeout=5)
    yield server


@pytest.fixture
def receiver(stack: dict[str, Any]) -> Iterator[ReceiverServer]:
    server: ReceiverServer = stack["receiver"]
    server.reset()
    yield server
    server.reset()


def control_root(server: Any) -> str:
    root: str = server.base_url.removesuffix("/fhir")
    return root


def script_standin(server: Any, *steps: dict[str, Any]) -> None:
    response = requests.post(
        f"{control_root(server)}/_control/script", json={"responses": list(steps)}, timeout=5
    )
    response.raise_for_status()


def standin_stats(server: Any) -> dict[str, Any]:
    stats: dict[str, Any] = requests.get(f"{control_root(server)}/_control/stats", timeout=5).json()
    return stats


def wait_until(predicate: Callable[[], Any], *, timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
