"""The ack path when a dependency is down: bounded answers, nothing half-written."""

import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests

from linking.models import IdempotencyRecord, LinkRequest
from merchant.services import CustomerCredentials
from tests.conftest import dispatching, link_body, queued_workflow_ids, wait_broker_messages
from tests.processes import BIN, child_env, free_port, gunicorn, running
from workflows.models import Status, Workflow

pytestmark = pytest.mark.django_db(transaction=True)


@contextmanager
def black_hole() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a stalled server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


def _wait_for_log(log: Any, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log.seek(0)
        output: str = log.read().decode()
        if text in output or time.monotonic() > deadline:
            return output
        time.sleep(0.1)


def post_link(base: str, token: str, body: dict, key: str) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.post(
        f"{base}/link",
        json=body,
        timeout=30,
        headers={"customer-token": token, "Idempotency-Key": key},
    )
    return response, time.monotonic() - started


@pytest.mark.parametrize("broker", ["refused", "stalled"])
def test_broker_down_still_answers_202_in_bounded_time(
    credentials: CustomerCredentials, broker: str, redis_db: Any
) -> None:
    with (
        black_hole() as stalled_port,
        tempfile.TemporaryFile() as log,
        tempfile.TemporaryFile() as dispatch_log,
    ):
        port = free_port() if broker == "refused" else stalled_port
        env = child_env(CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0", LOG_LEVEL="INFO")
        body = link_body(full_name="Canary Broker-Down")
        with (
            gunicorn(env, log) as base,
            running([str(BIN / "python"), "manage.py", "dispatch"], env=env, log=dispatch_log),
        ):
            _wait_for_log(dispatch_log, "dispatcher: leading")
            response, elapsed = post_link(base, credentials.token, body, "k1")
            dispatched = _wait_for_log(dispatch_log, "publish failed for workflow")
        log.seek(0)
        output = log.read().decode()

    assert response.status_code == 202, output
    assert elapsed < 2, elapsed  # the web process never talks to the broker
    workflow = Workflow.objects.get(id=response.json()["workflow-id"])
    assert workflow.status == Status.RECEIVED
    assert LinkRequest.objects.filter(request_id=workflow.request_id).exists()
    assert IdempotencyRecord.objects.filter(workflow=workflow).exists()
    assert f"publish failed for workflow {workflow.id}" in dispatched  # and kept retrying
    for text in (output, dispatched):
        assert "Canary" not in text and "1980-04-02" not in text
    # The broker is back (the real one): the next dispatcher to lead publishes it.
    with dispatching():
        messages = wait_broker_messages(redis_db, 1)
    assert queued_workflow_ids(messages) == [str(workflow.id)]


@pytest.mark.parametrize("database", ["refused", "stalled"])
def test_database_down_is_a_fast_503(credentials: CustomerCredentials, database: str) -> None:
    with black_hole() as stalled_port:
        port = free_port() if database == "refused" else stalled_port
        env = child_env(DATABASE_URL=f"postgres://127.0.0.1:{port}/merchant")
        with gunicorn(env) as base:
            response, elapsed = post_link(base, credentials.token, link_body(), "k1")

    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/service-unavailable"
    assert int(response.headers["Retry-After"]) > 0
    assert elapsed < 5, elapsed
    assert Workflow.objects.count() == 0
