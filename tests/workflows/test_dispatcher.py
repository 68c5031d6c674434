"""The dispatcher (workflows/dispatcher.py): the scheduler's runner, woken by PostgreSQL's
notifications, with exactly one leader; what it publishes is what is due, in batches, and a new
leader publishes what became due while nobody led."""

import datetime as dt
import json
import logging
import re
import threading
import time
import uuid
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone
from prometheus_client import REGISTRY

import workflows.dispatcher as dispatcher_module
import workflows.scheduler as scheduler_module
from linking.services import link_accept
from merchant.services import CustomerCredentials
from tests.conftest import (
    broker_messages,
    dispatching,
    every_logger_into,
    link_body,
    queued_workflow_ids,
    wait_broker_messages,
)
from workflows.models import Status, Workflow, WorkflowTransition
from workflows.services import workflow_announcement

pytestmark = pytest.mark.django_db(transaction=True)


def accept(credentials: CustomerCredentials, key: str) -> str:
    body = link_body(id=str(uuid.uuid4()))
    accepted = link_accept(
        customer=credentials.customer,
        idempotency_key=key,
        body=body,
        request_data=json.loads(json.dumps(body)),
    )
    assert accepted.status == 202
    return str(accepted.body["workflow-id"])


def announce(workflow: Workflow) -> None:
    """pg_notify as the ack's statement sends it: delivered at the commit, if any."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", workflow_announcement(workflow_id=workflow.id))


def published_ids(redis_db: Any) -> list[str]:
    return queued_workflow_ids(broker_messages(redis_db))


def unannounced(credentials: CustomerCredentials, *, age: dt.timedelta | None = None) -> Workflow:
    """A RECEIVED workflow whose announcement nobody heard (written without one)."""
    workflow = Workflow.objects.create(
        customer=credentials.customer, patient_id=uuid.uuid4(), request_id=uuid.uuid4()
    )
    WorkflowTransition.objects.create(
        workflow=workflow, source="", target=Status.RECEIVED, actor="api", reason="accepted"
    )
    if age is not None:
        Workflow.objects.filter(id=workflow.id).update(updated_at=timezone.now() - age)
    return workflow


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(record.getMessage() for record in self.records)


def test_one_dispatcher_leads_and_another_takes_over(
    credentials: CustomerCredentials, redis_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher_module, "LEADER_RETRY_SECONDS", 0.05)
    with dispatching() as first, dispatching(lead=False) as second:
        time.sleep(0.3)
        assert not second.leading.is_set()  # the lock is the first one's
        one = accept(credentials, "one")
        wait_broker_messages(redis_db, 1)
        assert published_ids(redis_db) == [one]
        time.sleep(0.2)
        assert (first.published, second.published) == (1, 0)

        first.stop()  # its session ends, the lock with it
        two = accept(credentials, "two")  # announced while nobody leads
        assert second.leading.wait(5)
        wait_broker_messages(redis_db, 2)
        three = accept(credentials, "three")
        wait_broker_messages(redis_db, 3)
        time.sleep(0.2)
    # What the first published is in flight: not sent again. What became due while nobody led
    # is due still: the new leader sends it, then the new one.
    assert sorted(published_ids(redis_db)) == sorted([one, two, three])
    # (`two` went with whichever led at that moment: the first may still have run a tick.)
    assert first.published + second.published == 3 and second.published >= 1


def test_leading_and_publishing_are_in_the_metrics(
    credentials: CustomerCredentials, redis_db: Any
) -> None:
    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    published = sample("merchant_dispatcher_published_total")
    assert sample("merchant_dispatcher_leading") == 0
    with dispatching():
        assert sample("merchant_dispatcher_leading") == 1
        accept(credentials, "metered")
        wait_broker_messages(redis_db, 1)
        deadline = time.monotonic() + 5
        while sample("merchant_dispatcher_published_total") == published:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert sample("merchant_dispatcher_published_total") == published + 1
    assert sample("merchant_dispatcher_leading") == 0


def test_what_is_due_is_published_whatever_its_age_and_nothing_else(
    credentials: CustomerCredentials, redis_db: Any, settings: Any
) -> None:
    settings.RECONCILE_STALE_AFTER_SECONDS = 600
    recent = unannounced(credentials)
    old = unannounced(credentials, age=dt.timedelta(seconds=700))  # due for long: still due
    later = unannounced(credentials)  # a retry's backoff: not yet
    Workflow.objects.filter(id=later.id).update(due_at=timezone.now() + dt.timedelta(hours=1))
    waiting = unannounced(credentials)  # an asynchronous search's callback: not due
    Workflow.objects.filter(id=waiting.id).update(status=Status.REQUESTED, due_at=None)
    with dispatching() as running:
        wait_broker_messages(redis_db, 1)
        time.sleep(0.2)
    assert sorted(published_ids(redis_db)) == sorted([str(recent.id), str(old.id)])
    assert running.published == 2
    rows = {w.id: w for w in Workflow.objects.all()}
    assert rows[recent.id].published_at and rows[recent.id].due_at is None
    assert rows[later.id].published_at is None and rows[later.id].due_at


def test_a_burst_is_published_in_few_batches(
    credentials: CustomerCredentials, redis_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    publish = scheduler_module.workflows_publish

    def counting(*, workflow_ids: list[str]) -> int:
        batches.append(len(workflow_ids))
        return publish(workflow_ids=workflow_ids)

    monkeypatch.setattr(scheduler_module, "workflows_publish", counting)
    with dispatching():
        with transaction.atomic():  # 200 announcements delivered together at the commit
            workflows = [unannounced(credentials) for _ in range(200)]
            for workflow in workflows:
                announce(workflow)
            time.sleep(0.2)
            assert broker_messages(redis_db) == []  # nothing before the commit
        wait_broker_messages(redis_db, 200)
    assert sorted(published_ids(redis_db)) == sorted(str(w.id) for w in workflows)
    assert sum(batches) == 200
    assert len(batches) <= 5, batches
    # WORKER_BATCH_SIZE (50) workflows per message.
    assert len(broker_messages(redis_db)) == 4


def test_a_foreign_notification_only_wakes_it(
    credentials: CustomerCredentials, redis_db: Any
) -> None:
    kept = _Keep()
    with every_logger_into(kept), dispatching():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_notify(%s, %s)", ["workflows_received", "Jane Canary 1980-04-02"]
            )
        one = accept(credentials, "after")
        wait_broker_messages(redis_db, 1)
    assert published_ids(redis_db) == [one]
    text = kept.text()
    assert "Canary" not in text and "1980" not in text


def test_a_lost_database_session_is_opened_again(
    credentials: CustomerCredentials, redis_db: Any
) -> None:
    kept = _Keep()
    with every_logger_into(kept), dispatching() as running:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            assert cursor.fetchone() is not None
        deadline = time.monotonic() + 10
        while "reconnecting" not in kept.text() and time.monotonic() < deadline:
            time.sleep(0.01)
        # AdminShutdown, or OperationalError if the socket's end is seen first.
        assert re.search(r"dispatcher: \w+; reconnecting in 1 s", kept.text())
        assert running.leading.wait(10)  # reconnected, leading again
        one = accept(credentials, "after-restart")
        wait_broker_messages(redis_db, 1)
    assert published_ids(redis_db) == [one]


def test_an_announcement_is_published_within_the_linger_not_the_poll(
    credentials: CustomerCredentials, redis_db: Any
) -> None:
    running = dispatcher_module.Dispatcher(poll_seconds=5.0)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        assert running.leading.wait(10)
        time.sleep(0.3)  # its first tick is done: it now waits on the channel
        started = time.monotonic()
        accept(credentials, "quick")
        wait_broker_messages(redis_db, 1)
        assert time.monotonic() - started < 1.0  # not the 5 s poll
    finally:
        running.stop()
        thread.join(timeout=10)
