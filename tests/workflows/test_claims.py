"""Claims kept alive by heartbeats and handed back on shutdown (workflows/claims.py), against
the real PostgreSQL; the consumer's side of it with the FHIR stand-in as the internal system."""

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from linking.services import links_process
from merchant.models import Customer
from standin.server import make_server
from tests.conftest import LinkClient, link_body, new_customer
from tests.processes import serving
from workflows import concurrent
from workflows.claims import (
    Held,
    claims_shutdown_begin,
    claims_shutdown_cancel,
    claims_shutdown_deadline,
)
from workflows.models import Status, Workflow, WorkflowTransition
from workflows.scheduler import PutBack, workflows_put_back
from workflows.services import workflows_claim


@pytest.fixture
def customer(db: None) -> Customer:
    return new_customer().customer


@pytest.fixture(autouse=True)
def no_shutdown() -> Iterator[None]:
    claims_shutdown_cancel()
    yield
    claims_shutdown_cancel()


def claimed(customer: Customer, count: int = 1) -> list[Workflow]:
    workflows = [
        Workflow.objects.create(customer=customer, patient_id=uuid.uuid4()) for _ in range(count)
    ]
    taken = workflows_claim(workflow_ids=[w.id for w in workflows], actor="worker")
    assert len(taken) == count
    return taken


def lease_end(workflow: Workflow) -> dt.datetime:
    until = Workflow.objects.get(id=workflow.id).claimed_until
    assert until is not None
    return until


def test_one_beat_renews_every_claim_held_in_one_statement(customer, settings):
    settings.WORKFLOW_CLAIM_LEASE_SECONDS = 30
    workflows = claimed(customer, 5)
    Workflow.objects.filter(id__in=[w.id for w in workflows]).update(
        claimed_until=timezone.now() + dt.timedelta(seconds=1)
    )
    held = Held()
    held.hold({w.id: w.claim_id for w in workflows if w.claim_id})
    before = timezone.now()
    with CaptureQueriesContext(connection) as queries:
        assert held.beat() == 5
    assert len(queries) == 1
    for workflow in workflows:
        assert lease_end(workflow) >= before + dt.timedelta(seconds=29)


def test_a_claim_taken_over_is_lost_and_never_renewed(customer):
    mine, other = claimed(customer, 2)
    held = Held()
    held.hold({w.id: w.claim_id for w in (mine, other) if w.claim_id})
    # The lease ended during a long pause and another consumer claimed it.
    Workflow.objects.filter(id=other.id).update(claim_id=uuid.uuid4())
    theirs = lease_end(other)
    assert held.beat() == 1
    assert held.lost(other.id) and not held.lost(mine.id)
    assert lease_end(other) == theirs
    assert set(held.held()) == {mine.id}


@pytest.mark.django_db(transaction=True)
def test_a_row_locked_by_its_ending_is_skipped_not_waited_for_nor_lost(settings):
    import psycopg

    customer = new_customer().customer
    locked, free = claimed(customer, 2)
    held = Held()
    held.hold({w.id: w.claim_id for w in (locked, free) if w.claim_id})
    before = lease_end(locked)
    dsn = connection.get_connection_params()
    with psycopg.connect(**dsn, autocommit=False) as other:
        # Another transaction (a batch's ending) holds the row.
        other.execute("SELECT 1 FROM workflows_workflow WHERE id = %s FOR UPDATE", [locked.id])
        started = time.monotonic()
        assert held.beat() == 1
        assert time.monotonic() - started < 1
        other.rollback()
    assert not held.lost(locked.id) and set(held.held()) == {locked.id, free.id}
    assert lease_end(locked) == before
    held.drop([locked.id, free.id])
    time.sleep(0.1)


def test_a_claim_held_past_the_task_time_limit_lapses(customer, settings):
    (workflow,) = claimed(customer)
    held = Held()
    assert workflow.claim_id
    held.hold({workflow.id: workflow.claim_id})
    settings.CELERY_TASK_TIME_LIMIT = 0  # every claim is now older than the time limit
    before = lease_end(workflow)
    assert held.beat() == 0
    assert lease_end(workflow) == before and held.held() == {}


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_thread_renews_while_claims_are_held(settings):
    customer = new_customer().customer
    settings.WORKFLOW_HEARTBEAT_SECONDS = 0.2
    settings.WORKFLOW_CLAIM_LEASE_SECONDS = 30
    (workflow,) = claimed(customer)
    Workflow.objects.filter(id=workflow.id).update(claimed_until=timezone.now())
    assert workflow.claim_id
    held = Held()
    held.hold({workflow.id: workflow.claim_id})
    deadline = time.monotonic() + 5
    while lease_end(workflow) < timezone.now() + dt.timedelta(seconds=20):
        assert time.monotonic() < deadline, "no heartbeat renewed the claim"
        time.sleep(0.05)
    held.drop([workflow.id])
    time.sleep(0.5)  # the thread ends with nothing held, and closes its connection


def test_hand_back_frees_at_once_and_refunds_the_attempt(customer):
    mine, other = claimed(customer, 2)
    assert mine.claim_id and other.claim_id
    Workflow.objects.filter(id=other.id).update(claim_id=uuid.uuid4())
    before = timezone.now()
    handed = workflows_put_back(
        put=[
            PutBack(w.id, w.claim_id, 0.0, "handed back", refund=True)
            for w in (mine, other)
            if w.claim_id
        ],
        actor="worker",
    )
    assert handed == [mine.id]
    row = Workflow.objects.get(id=mine.id)
    assert (row.status, row.attempts, row.claim_id) == (Status.IN_PROGRESS, 0, None)
    # Due at once, no longer in flight.
    assert (row.claimed_until, row.published_at) == (None, None)
    assert row.due_at is not None and before <= row.due_at <= timezone.now()
    assert WorkflowTransition.objects.filter(workflow=mine, reason="handed back").exists()
    assert Workflow.objects.get(id=other.id).attempts == 1  # not ours: untouched
    # The next claim takes it at once and counts one attempt in all.
    (again,) = workflows_claim(workflow_ids=[mine.id], actor="worker")
    assert again.attempts == 1


def test_waves_stop_at_the_deadline() -> None:
    slow: Future[int] = Future()
    fast: Future[int] = Future()
    fast.set_result(1)
    until = time.monotonic() + 0.3
    started = time.monotonic()
    waves = list(concurrent.in_waves([fast, slow], linger=0.05, deadline=lambda: until))
    assert waves == [[fast]]
    assert 0.25 < time.monotonic() - started < 1.5


def test_a_worker_shutting_down_claims_no_new_batch(customer):
    workflow = Workflow.objects.create(customer=customer, patient_id=uuid.uuid4())
    claims_shutdown_begin(grace=5)
    Workflow.objects.filter(id=workflow.id).update(due_at=None, published_at=timezone.now())
    processed = links_process(workflow_ids=[str(workflow.id)])
    assert processed.not_claimed == [workflow.id]
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.attempts, row.claim_id) == (Status.RECEIVED, 0, None)
    # Due again at once, for another worker.
    assert row.published_at is None and row.due_at is not None


@pytest.mark.django_db(transaction=True)
def test_searches_unfinished_at_the_grace_end_are_handed_back(settings, credentials):
    # A 3 s search; the shutdown begins 0.3 s into it with a 0.5 s grace.
    server = make_server("127.0.0.1", 0, latency_ms=3000)
    settings.INTERNAL_SEARCH_URL = server.base_url
    api = LinkClient(credentials.token)
    response = api.post_link(link_body(), key="shutdown-1")
    assert response.status_code == 202
    workflow_id = uuid.UUID(response.json()["workflow-id"])
    timer = threading.Timer(0.3, lambda: claims_shutdown_begin(grace=0.5))
    with serving(server):
        timer.start()
        started = time.monotonic()
        processed = links_process(workflow_ids=[str(workflow_id)])
        took = time.monotonic() - started
    assert claims_shutdown_deadline() is not None
    assert [(p.workflow_id, p.refund, p.due_in) for p in processed.put_back] == [
        (workflow_id, True, 0.0)
    ]
    assert took < 2.5  # did not wait for the search
    row = Workflow.objects.get(id=workflow_id)
    assert (row.status, row.attempts, row.claim_id) == (Status.IN_PROGRESS, 0, None)
    assert row.due_at is not None and row.due_at <= timezone.now()
    # The next worker resumes it at once, and its answer ends it: one attempt in all.
    claims_shutdown_cancel()
    with serving(fresh := make_server("127.0.0.1", 0)):
        settings.INTERNAL_SEARCH_URL = fresh.base_url
        assert links_process(workflow_ids=[str(workflow_id)]).put_back == []
    row = Workflow.objects.get(id=workflow_id)
    assert (row.status, row.result, row.attempts) == (Status.COMPLETED, "LINKED", 1)
