"""workflow_claim, the consumer's single-statement claim: who gets a workflow, and when."""

import datetime as dt
import threading
import uuid

import pytest
from django.db import connection
from django.utils import timezone
from django_fsm import can_proceed

from merchant.models import Customer
from tests.conftest import new_customer
from workflows import statements
from workflows.models import Status, Workflow, WorkflowTransition
from workflows.services import workflow_claim


def workflow_in(customer: Customer, status: str, **fields: object) -> Workflow:
    workflow = Workflow(customer=customer, patient_id=uuid.uuid4(), status=status, **fields)
    workflow.save()
    return workflow


@pytest.fixture
def customer(db: None) -> Customer:
    return new_customer().customer


def timeline(workflow: Workflow) -> list[tuple[str, str, str]]:
    return list(
        WorkflowTransition.objects.filter(workflow=workflow).values_list(
            "source", "target", "actor"
        )
    )


def test_a_received_workflow_is_started_claimed_and_counted(customer: Customer) -> None:
    workflow = workflow_in(customer, Status.RECEIVED)
    before = timezone.now()

    claimed = workflow_claim(workflow_id=workflow.id, actor="worker")

    assert claimed is not None and claimed.id == workflow.id
    stored = Workflow.objects.get(id=workflow.id)
    assert (stored.status, stored.attempts) == (Status.IN_PROGRESS, 1)
    assert stored.claim_id == claimed.claim_id is not None
    assert stored.claimed_until is not None and stored.claimed_until > before
    assert (claimed.status, claimed.attempts, claimed.customer_id) == (
        Status.IN_PROGRESS,
        1,
        customer.id,
    )
    assert timeline(workflow) == [(Status.RECEIVED, Status.IN_PROGRESS, "worker")]


@pytest.mark.parametrize("status", list(statements.CLAIMABLE_STATES))
def test_the_claims_status_change_is_the_state_machines_start(
    customer: Customer, status: str
) -> None:
    # The claim changes the status in SQL; the state machine is what says how. What start()
    # does to a copy of the row (or does not: a status it cannot start from) is what the claim
    # does to the row, and its timeline line.
    workflow = workflow_in(customer, status)
    expected = Workflow.objects.get(id=workflow.id)
    if can_proceed(expected.start):
        expected.start()
    claimed = workflow_claim(workflow_id=workflow.id, actor="worker")
    assert claimed is not None
    assert claimed.status == Workflow.objects.get(id=workflow.id).status == expected.status
    changed = [(status, expected.status, "worker")] if expected.status != status else []
    assert timeline(workflow) == changed


@pytest.mark.parametrize(
    "status", [Status.IN_PROGRESS, Status.REQUESTED, Status.LINKED, Status.NO_RESULTS]
)
def test_a_resumed_workflow_keeps_its_status_and_records_no_transition(
    customer: Customer, status: str
) -> None:
    workflow = workflow_in(customer, status, attempts=2)

    claimed = workflow_claim(workflow_id=workflow.id, actor="worker")

    assert claimed is not None
    assert (claimed.status, claimed.attempts) == (status, 3)
    assert timeline(workflow) == []


@pytest.mark.parametrize("status", [Status.REVIEW, Status.COMPLETED, Status.FAILED])
def test_nothing_to_claim_in_review_or_ended(customer: Customer, status: str) -> None:
    workflow = workflow_in(customer, status)

    assert workflow_claim(workflow_id=workflow.id, actor="worker") is None
    assert Workflow.objects.get(id=workflow.id).attempts == 0


def test_an_unknown_workflow_is_nothing_to_claim(db: None) -> None:
    assert workflow_claim(workflow_id=uuid.uuid4(), actor="worker") is None


def test_a_live_claim_is_not_taken_by_another(customer: Customer) -> None:
    workflow = workflow_in(customer, Status.RECEIVED)
    first = workflow_claim(workflow_id=workflow.id, actor="worker")
    assert first is not None and first.published_at is not None  # claimed is in flight

    assert workflow_claim(workflow_id=workflow.id, actor="worker") is None
    assert Workflow.objects.get(id=workflow.id).attempts == 1


def test_work_due_later_is_not_claimed_before_its_time(customer: Customer) -> None:
    # A stray or duplicate message must not run a retry before its backoff ends.
    workflow = workflow_in(customer, Status.IN_PROGRESS, attempts=1)
    Workflow.objects.filter(id=workflow.id).update(due_at=timezone.now() + dt.timedelta(seconds=30))
    assert workflow_claim(workflow_id=workflow.id, actor="worker") is None
    Workflow.objects.filter(id=workflow.id).update(due_at=timezone.now())
    claimed = workflow_claim(workflow_id=workflow.id, actor="worker")
    assert claimed is not None and claimed.due_at is None and claimed.attempts == 2


def test_an_expired_claim_is_taken_over(customer: Customer) -> None:
    crashed = uuid.uuid4()
    workflow = workflow_in(
        customer,
        Status.IN_PROGRESS,
        attempts=1,
        claim_id=crashed,
        claimed_until=timezone.now() - dt.timedelta(seconds=1),
    )

    claimed = workflow_claim(workflow_id=workflow.id, actor="worker")

    assert claimed is not None
    assert claimed.claim_id not in (None, crashed)
    assert claimed.attempts == 2


@pytest.mark.django_db(transaction=True)
def test_of_many_concurrent_claimers_exactly_one_wins() -> None:
    """Real concurrency: each thread on its own PostgreSQL connection, released together."""
    customer = new_customer().customer
    workflow = workflow_in(customer, Status.RECEIVED)
    claimers = 8
    barrier = threading.Barrier(claimers)
    results: list[Workflow | None] = []
    lock = threading.Lock()

    def claim() -> None:
        try:
            barrier.wait()
            claimed = workflow_claim(workflow_id=workflow.id, actor="worker")
            with lock:
                results.append(claimed)
        finally:
            connection.close()

    threads = [threading.Thread(target=claim) for _ in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [r for r in results if r is not None]
    assert (len(results), len(winners)) == (claimers, 1)
    stored = Workflow.objects.get(id=workflow.id)
    assert (stored.status, stored.attempts, stored.claim_id) == (
        Status.IN_PROGRESS,
        1,
        winners[0].claim_id,
    )
    assert timeline(workflow) == [(Status.RECEIVED, Status.IN_PROGRESS, "worker")]
