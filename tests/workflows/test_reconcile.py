"""The reconciliation sweep and the operator's re-queue / mark-failed services, on the
real PostgreSQL (row locks, SKIP LOCKED) and the real Redis broker."""

import datetime as dt
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone
from django_fsm import TransitionNotAllowed

from merchant.models import Customer
from merchant.services import CustomerCredentials
from tests.conftest import (
    LinkClient,
    broker_messages,
    link_body,
    new_customer,
    queued_delivery_ids,
    queued_workflow_ids,
)
from workflows.models import (
    PENDING_STATES,
    SWEPT_STATES,
    DeliveryStatus,
    Status,
    WebhookDelivery,
    Workflow,
    WorkflowTransition,
)
from workflows.selectors import workflows_stuck_report
from workflows.services import (
    ReconcileReport,
    workflow_mark_failed,
    workflow_requeue,
    workflows_reconcile,
)
from workflows.services.reconcile import MAX_BATCHES_PER_RUN

pytestmark = pytest.mark.django_db

NOTHING_TO_DO: dict[str, list[str]] = {"requeued": [], "failed": [], "expired": []}

STALE_AFTER = 300
MAX_ATTEMPTS = 5


@pytest.fixture(autouse=True)
def sweep_settings(settings: Any) -> None:
    settings.RECONCILE_STALE_AFTER_SECONDS = STALE_AFTER
    settings.RECONCILE_BATCH_SIZE = 500
    settings.WORKFLOW_MAX_ATTEMPTS = MAX_ATTEMPTS


@pytest.fixture
def customer(credentials: CustomerCredentials) -> Customer:
    return credentials.customer


def make(
    customer: Customer,
    status: str = Status.RECEIVED,
    *,
    age: dt.timedelta | None = None,
    attempts: int = 0,
    requeues: int = 0,
) -> Workflow:
    workflow = Workflow(
        customer=customer,
        patient_id=uuid.uuid4(),
        status=status,
        attempts=attempts,
        requeues=requeues,
    )
    workflow.save()
    if age is not None:
        backdate(workflow, age)
    return Workflow.objects.get(id=workflow.id)


def backdate(workflow: Workflow, age: dt.timedelta) -> None:
    Workflow.objects.filter(id=workflow.id).update(updated_at=timezone.now() - age)


STALE = dt.timedelta(seconds=STALE_AFTER + 60)


def published(redis_db: Any) -> list[dict[str, Any]]:
    messages = broker_messages(redis_db)
    return [{"workflow-id": i} for i in queued_workflow_ids(messages)]


def snapshot(workflow: Workflow) -> tuple[Any, ...]:
    row = Workflow.objects.get(id=workflow.id)
    return (
        row.status,
        row.attempts,
        row.requeues,
        row.updated_at,
        row.reason,
        row.transitions.count(),
        row.deliveries.count(),
    )


# --- the sweep --------------------------------------------------------------------------------


def test_stale_received_workflow_is_requeued_and_published_after_commit(
    api: LinkClient, redis_db, django_capture_on_commit_callbacks
):
    body = link_body(full_name="Canary Zyxwvut", dob="1977-07-07")
    workflow = Workflow.objects.get(id=api.post_link(body).json()["workflow-id"])
    backdate(workflow, dt.timedelta(minutes=10))
    stale_at = Workflow.objects.get(id=workflow.id).updated_at
    assert broker_messages(redis_db) == []

    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        report = workflows_reconcile()
        assert broker_messages(redis_db) == []  # nothing leaves before the commit
    assert isinstance(report, ReconcileReport)
    assert (report.requeued, report.failed) == ([workflow.id], [])

    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.requeues, row.attempts) == (Status.RECEIVED, 1, 0)
    assert row.updated_at >= before > stale_at
    last = row.transitions.last()
    assert last is not None
    assert (last.source, last.target, last.actor) == ("RECEIVED", "RECEIVED", "sweep")
    assert last.reason == "re-queued by the reconciliation sweep"

    # Ids only: one batch message naming the workflow.
    [message] = broker_messages(redis_db)
    assert (message["task"], message["args"], message["kwargs"]) == (
        "workflows.process_workflows",
        [[str(workflow.id)]],
        {},
    )
    for secret in ("Canary", "Zyxwvut", "1977-07-07", "jane@example.org", "555-0100"):
        assert secret not in message["raw"]


def test_fresh_workflows_are_left_alone(customer, redis_db, django_capture_on_commit_callbacks):
    fresh = make(customer, age=dt.timedelta(seconds=STALE_AFTER - 60))
    brand_new = make(customer, Status.IN_PROGRESS)
    stale = make(customer, age=STALE)
    before = [snapshot(fresh), snapshot(brand_new)]
    with django_capture_on_commit_callbacks(execute=True):
        report = workflows_reconcile()
    assert (report.requeued, report.failed) == ([stale.id], [])
    assert [snapshot(fresh), snapshot(brand_new)] == before
    assert [m["workflow-id"] for m in published(redis_db)] == [str(stale.id)]


def test_a_requeued_workflow_is_not_stale_again_at_once(customer, redis_db):
    make(customer, age=STALE)
    assert len(workflows_reconcile().requeued) == 1
    assert workflows_reconcile().requeued == []


def test_stale_after_can_be_given_per_run(customer):
    workflow = make(customer, age=dt.timedelta(seconds=30))
    assert workflows_reconcile().requeued == []
    assert workflows_reconcile(stale_after_seconds=10).requeued == [workflow.id]


@pytest.mark.parametrize("status", SWEPT_STATES)
def test_every_pending_state_but_review_is_swept(customer, status):
    workflow = make(customer, status, age=STALE, attempts=1)
    assert workflows_reconcile().requeued == [workflow.id]
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.requeues, row.attempts) == (status, 1, 1)


def test_review_is_reported_but_never_swept(customer, redis_db):
    assert set(PENDING_STATES) - set(SWEPT_STATES) == {Status.REVIEW}
    waiting = make(customer, Status.REVIEW, age=STALE * 100, attempts=MAX_ATTEMPTS + 3)
    assert workflows_reconcile(dry_run=True).as_dict() == {
        "requeued": [],
        "failed": [],
        "expired": [],
    }
    assert workflows_reconcile().as_dict() == NOTHING_TO_DO
    row = Workflow.objects.get(id=waiting.id)
    assert (row.status, row.requeues, row.updated_at) == (Status.REVIEW, 0, waiting.updated_at)
    assert broker_messages(redis_db) == []
    report = workflows_stuck_report()
    assert (report["total"], report["by_state"]) == (1, {"REVIEW": 1})
    with pytest.raises(ValueError, match="awaits review"):
        workflow_requeue(workflow_id=waiting.id, actor="operator:ops")


REVIEW_TIMEOUT = dt.timedelta(days=7)


def test_a_review_past_its_timeout_ends_with_no_match(customer, settings):
    settings.REVIEW_TIMEOUT_SECONDS = int(REVIEW_TIMEOUT.total_seconds())
    expired = make(customer, Status.REVIEW, age=REVIEW_TIMEOUT + dt.timedelta(minutes=1))
    waiting = make(customer, Status.REVIEW, age=REVIEW_TIMEOUT - dt.timedelta(minutes=1))
    preview = workflows_reconcile(dry_run=True)
    assert preview.expired == [expired.id]
    assert Workflow.objects.get(id=expired.id).status == Status.REVIEW  # a preview only
    assert workflows_reconcile().expired == [expired.id]
    row = Workflow.objects.get(id=expired.id)
    assert (row.status, row.result, row.reason) == (
        Status.COMPLETED,
        "NO_RESULTS",
        "review expired",
    )
    assert [(t.source, t.target, t.actor) for t in row.transitions.order_by("id")] == [
        (Status.REVIEW, Status.NO_RESULTS, "sweep"),
        (Status.NO_RESULTS, Status.COMPLETED, "sweep"),
    ]
    [delivery] = WebhookDelivery.objects.filter(workflow=row)
    assert (delivery.event_type, delivery.status) == ("link.completed", DeliveryStatus.PENDING)
    assert Workflow.objects.get(id=waiting.id).status == Status.REVIEW
    assert workflows_reconcile().expired == []  # once


def test_the_review_timeout_is_a_setting(customer, settings):
    settings.REVIEW_TIMEOUT_SECONDS = 10
    review = make(customer, Status.REVIEW, age=dt.timedelta(seconds=11))
    assert workflows_reconcile().expired == [review.id]


@pytest.mark.django_db(transaction=True)
def test_a_review_being_decided_is_not_expired(customer, settings):
    """The decision holds the row's lock: the sweep skips it, the decision wins."""
    settings.REVIEW_TIMEOUT_SECONDS = 10
    deciding = make(customer, Status.REVIEW, age=dt.timedelta(days=1))
    with held(lambda: Workflow.objects.select_for_update().get(id=deciding.id)):
        assert workflows_reconcile().expired == []
    assert Workflow.objects.get(id=deciding.id).status == Status.REVIEW


def test_the_stuck_report_shows_reviews_by_reviewer_and_age(customer, settings):
    settings.REVIEW_TIMEOUT_SECONDS = 3 * 86400
    customer.review_by = "customer"
    customer.save()
    make(customer, Status.REVIEW, age=dt.timedelta(minutes=5))
    make(new_customer("Ops reviewed").customer, Status.REVIEW, age=dt.timedelta(days=2))
    reviews = workflows_stuck_report()["reviews"]
    assert (reviews["total"], reviews["by_reviewer"]) == (2, {"customer": 1, "operator": 1})
    assert reviews["by_age"] == {"<1h": 1, "1h-24h": 0, ">24h": 1}
    assert reviews["timeout_seconds"] == 3 * 86400


def test_dry_run_changes_nothing_and_publishes_nothing(
    customer, redis_db, django_capture_on_commit_callbacks
):
    stale = make(customer, age=STALE)
    spent = make(customer, Status.IN_PROGRESS, age=STALE, attempts=MAX_ATTEMPTS)
    before = [snapshot(stale), snapshot(spent)]
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        report = workflows_reconcile(dry_run=True)
    assert (report.requeued, report.failed) == ([stale.id], [spent.id])
    assert report.as_dict() == {
        "requeued": [str(stale.id)],
        "failed": [str(spent.id)],
        "expired": [],
    }
    assert callbacks == []
    assert broker_messages(redis_db) == []
    assert [snapshot(stale), snapshot(spent)] == before
    assert not WebhookDelivery.objects.exists()


@pytest.mark.parametrize(
    ("attempts", "requeues"),
    [(MAX_ATTEMPTS, 0), (MAX_ATTEMPTS, MAX_ATTEMPTS), (MAX_ATTEMPTS + 2, 1)],
)
def test_out_of_attempts_fails_and_tells_the_customer(
    customer, redis_db, django_capture_on_commit_callbacks, attempts, requeues
):
    workflow = make(customer, Status.IN_PROGRESS, age=STALE, attempts=attempts, requeues=requeues)
    with django_capture_on_commit_callbacks(execute=True):
        report = workflows_reconcile()
    assert (report.requeued, report.failed) == ([], [workflow.id])
    row = Workflow.objects.get(id=workflow.id)
    assert row.status == Status.FAILED
    assert row.reason == f"attempt limit reached ({attempts} attempts, {requeues} re-queues)"
    last = row.transitions.last()
    assert last is not None
    assert (last.source, last.target, last.actor) == ("IN_PROGRESS", "FAILED", "sweep")
    delivery = WebhookDelivery.objects.get(workflow=workflow)
    assert (delivery.event_type, delivery.status) == ("link.failed", DeliveryStatus.PENDING)
    assert row.reason in delivery.payload
    # The customer is told (a webhook task), the workflow is not processed again.
    assert queued_delivery_ids(broker_messages(redis_db)) == [delivery.id]


def test_one_below_the_limit_is_still_requeued(customer):
    workflow = make(
        customer,
        Status.IN_PROGRESS,
        age=STALE,
        attempts=MAX_ATTEMPTS - 1,
        requeues=MAX_ATTEMPTS - 1,
    )
    assert workflows_reconcile().requeued == [workflow.id]
    assert Workflow.objects.get(id=workflow.id).requeues == MAX_ATTEMPTS


def test_attempt_limit_is_a_setting(customer, settings):
    settings.WORKFLOW_MAX_ATTEMPTS = 2
    workflow = make(customer, Status.IN_PROGRESS, age=STALE, attempts=2)
    assert workflows_reconcile().failed == [workflow.id]


def test_requeues_that_found_nothing_to_do_cost_no_attempt(customer):
    # Re-queued many times (its messages found it claimed, or vanished), never attempted: only
    # processing attempts approach the cap, so it is re-queued again, not failed.
    workflow = make(customer, age=STALE, attempts=0, requeues=MAX_ATTEMPTS * 3)
    report = workflows_reconcile()
    assert (report.requeued, report.failed) == ([workflow.id], [])
    assert Workflow.objects.get(id=workflow.id).status == Status.RECEIVED


def claimed(workflow: Workflow, *, lease_ends_in: dt.timedelta) -> None:
    Workflow.objects.filter(id=workflow.id).update(
        claim_id=uuid.uuid4(), claimed_until=timezone.now() + lease_ends_in
    )


def test_a_claim_whose_lease_holds_is_neither_requeued_nor_counted(customer):
    # A worker that died mid-search left its claim: updated long ago, but the lease still runs.
    workflow = make(customer, Status.IN_PROGRESS, age=STALE, attempts=MAX_ATTEMPTS - 1)
    claimed(workflow, lease_ends_in=dt.timedelta(seconds=30))
    before = snapshot(workflow)
    for _ in range(MAX_ATTEMPTS + 1):
        assert workflows_reconcile() == ReconcileReport()
    assert snapshot(workflow) == before


def test_a_claimed_workflow_is_resumed_as_soon_as_its_lease_ended(customer):
    # Its worker stopped beating (workflows/claims.py): the lease measured the silence, so no
    # stale window is added on top of it, however recently the workflow changed.
    workflow = make(customer, Status.IN_PROGRESS, age=dt.timedelta(seconds=2), attempts=1)
    claimed(workflow, lease_ends_in=dt.timedelta(seconds=1))
    assert workflows_reconcile() == ReconcileReport()
    claimed(workflow, lease_ends_in=-dt.timedelta(milliseconds=10))
    assert workflows_reconcile().requeued == [workflow.id]
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.attempts, row.requeues) == (Status.IN_PROGRESS, 1, 1)
    # The dead claim goes with the re-queue: waiting in the queue is not a new silence, so the
    # next sweep leaves it for the stale window instead of re-queueing it again.
    assert (row.claim_id, row.claimed_until) == (None, None)
    assert workflows_reconcile() == ReconcileReport()


def test_an_operator_republish_keeps_a_live_claim(customer):
    from workflows.services import workflow_requeue

    workflow = make(customer, Status.IN_PROGRESS, age=STALE, attempts=1)
    claimed(workflow, lease_ends_in=dt.timedelta(seconds=30))
    claim = Workflow.objects.get(id=workflow.id).claim_id
    workflow_requeue(workflow_id=workflow.id, actor="ops")
    row = Workflow.objects.get(id=workflow.id)
    assert (row.claim_id, row.requeues) == (claim, 1)


def test_terminal_workflows_are_never_touched(customer, redis_db):
    done = make(customer, Status.COMPLETED, age=dt.timedelta(days=3), attempts=9, requeues=9)
    failed = make(customer, Status.FAILED, age=dt.timedelta(days=3), attempts=9, requeues=9)
    before = [snapshot(done), snapshot(failed)]
    report = workflows_reconcile(stale_after_seconds=0)
    assert (report.requeued, report.failed) == ([], [])
    assert [snapshot(done), snapshot(failed)] == before
    assert broker_messages(redis_db) == []


def test_small_batches_still_cover_everything_oldest_first(customer, settings):
    settings.RECONCILE_BATCH_SIZE = 4
    workflows = [make(customer, age=STALE + dt.timedelta(seconds=i)) for i in range(25)]
    report = workflows_reconcile()
    assert sorted(report.requeued) == sorted(w.id for w in workflows)
    assert report.requeued == [w.id for w in reversed(workflows)]
    assert set(Workflow.objects.values_list("requeues", flat=True)) == {1}


def test_one_run_is_capped_and_the_next_run_continues(customer, settings):
    settings.RECONCILE_BATCH_SIZE = 1
    workflows = [make(customer, age=STALE) for _ in range(MAX_BATCHES_PER_RUN + 3)]
    first = workflows_reconcile()
    assert len(first.requeued) == MAX_BATCHES_PER_RUN
    second = workflows_reconcile()
    assert sorted(first.requeued + second.requeued) == sorted(w.id for w in workflows)


def test_dry_run_reports_what_a_real_run_does(customer, settings):
    settings.RECONCILE_BATCH_SIZE = 4
    for _ in range(10):
        make(customer, age=STALE)
    dry = workflows_reconcile(dry_run=True)
    real = workflows_reconcile()
    assert sorted(dry.requeued) == sorted(real.requeued)


@pytest.mark.django_db(transaction=True)
def test_concurrent_sweeps_requeue_each_workflow_exactly_once(settings, redis_db):
    settings.RECONCILE_BATCH_SIZE = 10
    now = timezone.now()
    # 8 customers x 25 workflows, each customer's rows next to each other in age, so that two
    # sweeps really interleave (see test_sweep_skips_only_locked_workflows for why it matters).
    customers = [new_customer(f"Clinic {i}").customer for i in range(8)]
    Workflow.objects.bulk_create(
        Workflow(
            customer=customers[i // 25],
            patient_id=uuid.uuid4(),
            updated_at=now - dt.timedelta(hours=2, seconds=-i),
            created_at=now - dt.timedelta(hours=3),
        )
        for i in range(200)
    )
    ids = set(Workflow.objects.values_list("id", flat=True))
    barrier = threading.Barrier(2)
    reports: list[ReconcileReport] = []
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            barrier.wait(timeout=5)
            reports.append(workflows_reconcile())
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(reports) == 2
    first, second = (set(r.requeued) for r in reports)
    assert first.isdisjoint(second)
    assert first and second  # both really swept
    # A sweep that found everything locked stops early; whatever is left, the next run takes.
    leftover = set(workflows_reconcile().requeued)
    assert leftover.isdisjoint(first | second)
    assert first | second | leftover == ids

    sweep_rows = WorkflowTransition.objects.filter(actor="sweep")
    assert sweep_rows.count() == 200
    assert set(sweep_rows.values_list("workflow_id", flat=True)) == ids
    assert set(Workflow.objects.values_list("requeues", flat=True)) == {1}
    messages = published(redis_db)
    assert len(messages) == 200
    assert {uuid.UUID(m["workflow-id"]) for m in messages} == ids


@contextmanager
def held(query: Callable[[], Any]) -> Iterator[None]:
    """Run `query` in a transaction of another connection and keep its row locks meanwhile."""
    locked, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with transaction.atomic():
                query()
                locked.set()
                release.wait(10)
        except BaseException as exc:
            errors.append(exc)
            locked.set()
        finally:
            connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert locked.wait(10)
        assert errors == []
        yield
    finally:
        release.set()
        thread.join(timeout=10)


@pytest.mark.django_db(transaction=True)
def test_sweep_skips_a_workflow_locked_by_a_consumer(customer):
    busy = make(customer, age=STALE + dt.timedelta(minutes=1))
    others = [make(other.customer, age=STALE) for other in (new_customer("B"), new_customer("C"))]
    with held(lambda: Workflow.objects.select_for_update().get(id=busy.id)):
        report = workflows_reconcile()
    assert sorted(report.requeued) == sorted(w.id for w in others)
    assert Workflow.objects.get(id=busy.id).requeues == 0


@pytest.mark.django_db(transaction=True)
def test_sweep_skips_only_locked_workflows(customer):
    busy = make(customer, Status.IN_PROGRESS)
    stale = [make(customer, age=STALE) for _ in range(3)]
    consumer = Workflow.objects.select_for_update().select_related("customer")
    with held(lambda: consumer.get(id=busy.id)):
        report = workflows_reconcile()
    assert sorted(report.requeued) == sorted(w.id for w in stale)


# --- the operator's re-queue ------------------------------------------------------------------


def test_requeue_failed_workflow_starts_it_afresh(
    customer, redis_db, django_capture_on_commit_callbacks
):
    workflow = make(customer, Status.IN_PROGRESS, attempts=MAX_ATTEMPTS, requeues=3)
    workflow = workflow_mark_failed(workflow_id=workflow.id, actor="test", reason="stuck")
    Workflow.objects.filter(id=workflow.id).update(
        claim_id=uuid.uuid4(), claimed_until=timezone.now()
    )
    with django_capture_on_commit_callbacks(execute=True):
        result = workflow_requeue(workflow_id=workflow.id, actor="operator:ops", reason="INC-7")
        assert broker_messages(redis_db) == []
    assert result.status == Status.RECEIVED
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.attempts, row.requeues, row.reason, row.result) == (
        Status.RECEIVED,
        0,
        0,
        "",
        None,
    )
    assert (row.claim_id, row.claimed_until) == (None, None)
    last = row.transitions.last()
    assert last is not None
    assert (last.source, last.target, last.actor, last.reason) == (
        "FAILED",
        "RECEIVED",
        "operator:ops",
        "INC-7",
    )
    assert [m["workflow-id"] for m in published(redis_db)] == [str(workflow.id)]


def test_requeue_pending_workflow_publishes_it_again(
    customer, redis_db, django_capture_on_commit_callbacks
):
    workflow = make(customer, Status.IN_PROGRESS, attempts=2, age=dt.timedelta(hours=1))
    with django_capture_on_commit_callbacks(execute=True):
        workflow_requeue(workflow_id=workflow.id, actor="operator:ops")
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.attempts, row.requeues) == (Status.IN_PROGRESS, 2, 1)
    assert (timezone.now() - row.updated_at).total_seconds() < 60
    last = row.transitions.last()
    assert last is not None
    assert (last.source, last.target, last.actor, last.reason) == (
        "IN_PROGRESS",
        "IN_PROGRESS",
        "operator:ops",
        "re-published by an operator",
    )
    assert [m["workflow-id"] for m in published(redis_db)] == [str(workflow.id)]


def test_requeue_completed_workflow_is_refused(
    customer, redis_db, django_capture_on_commit_callbacks
):
    workflow = make(customer, Status.COMPLETED)
    before = snapshot(workflow)
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(ValueError, match="COMPLETED"),
    ):
        workflow_requeue(workflow_id=workflow.id, actor="operator:ops")
    assert snapshot(workflow) == before
    assert broker_messages(redis_db) == []


def test_requeue_unknown_workflow():
    with pytest.raises(Workflow.DoesNotExist):
        workflow_requeue(workflow_id=uuid.uuid4(), actor="operator:ops")


# --- the operator's mark-failed ---------------------------------------------------------------


@pytest.mark.parametrize("reason", ["", "   "])
def test_mark_failed_requires_a_reason(customer, reason):
    workflow = make(customer, Status.IN_PROGRESS)
    before = snapshot(workflow)
    with pytest.raises(ValueError, match="reason"):
        workflow_mark_failed(workflow_id=workflow.id, actor="operator:ops", reason=reason)
    assert snapshot(workflow) == before


def test_mark_failed_fails_and_creates_the_delivery(customer):
    workflow = make(customer, Status.REQUESTED)
    result = workflow_mark_failed(
        workflow_id=workflow.id, actor="operator:ops", reason="internal system lost the job"
    )
    assert result.status == Status.FAILED
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.reason) == (Status.FAILED, "internal system lost the job")
    last = row.transitions.last()
    assert last is not None
    assert (last.source, last.target, last.actor) == ("REQUESTED", "FAILED", "operator:ops")
    delivery = WebhookDelivery.objects.get(workflow=workflow)
    assert (delivery.event_type, delivery.status, delivery.attempts) == (
        "link.failed",
        DeliveryStatus.PENDING,
        0,
    )
    assert "internal system lost the job" in delivery.payload


def test_mark_failed_refuses_a_finished_workflow(customer):
    workflow = make(customer, Status.COMPLETED)
    with pytest.raises(TransitionNotAllowed):
        workflow_mark_failed(workflow_id=workflow.id, actor="operator:ops", reason="why")
    assert not WebhookDelivery.objects.exists()


# --- a re-queued workflow that fails again ------------------------------------------------------


def test_a_requeued_workflow_can_be_failed_again(customer):
    workflow = make(customer, Status.IN_PROGRESS)
    workflow_mark_failed(workflow_id=workflow.id, actor="operator:ops", reason="first")
    workflow_requeue(workflow_id=workflow.id, actor="operator:ops")
    workflow_mark_failed(workflow_id=workflow.id, actor="operator:ops", reason="second")
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.reason) == (Status.FAILED, "second")


def test_sweep_survives_a_requeued_workflow_running_out_of_attempts(customer):
    relapsed = make(customer, Status.IN_PROGRESS)
    workflow_mark_failed(workflow_id=relapsed.id, actor="operator:ops", reason="first")
    workflow_requeue(workflow_id=relapsed.id, actor="operator:ops")
    Workflow.objects.filter(id=relapsed.id).update(attempts=MAX_ATTEMPTS)
    backdate(relapsed, STALE + dt.timedelta(minutes=5))  # the oldest: first in the batch
    other = make(customer, age=STALE)
    report = workflows_reconcile()
    assert report.failed == [relapsed.id]
    assert report.requeued == [other.id]
    assert Workflow.objects.get(id=other.id).requeues == 1
