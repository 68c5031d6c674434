"""The reconciliation sweep and the operator's re-queue / mark-failed services, on the
real PostgreSQL (row locks, SKIP LOCKED) and the real Redis broker.

PostgreSQL is the schedule (workflows/scheduler.py): the sweep publishes nothing. It makes due
what waits on nothing (idle: neither due nor in flight, untouched for the stale window), fails
what ran out of attempts or passed its deadline, and leaves the due and in-flight work to the
scheduler."""

import base64
import datetime as dt
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import pytest
from django.db import connection, transaction
from django.utils import timezone
from django_fsm import TransitionNotAllowed

from linking.services import link_process
from merchant.models import Customer
from merchant.services import CustomerCredentials
from standin.server import StandinServer, make_server
from tests.conftest import (
    LinkClient,
    broker_messages,
    link_body,
    new_customer,
    queued_delivery_ids,
    queued_workflow_ids,
)
from tests.processes import serving
from workflows import scheduler
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

SWEEP_REASON = "due again: made due by the reconciliation sweep"
OPERATOR_REASON = "made due by an operator"


@pytest.fixture(autouse=True)
def sweep_settings(settings: Any) -> None:
    settings.RECONCILE_STALE_AFTER_SECONDS = STALE_AFTER
    settings.RECONCILE_BATCH_SIZE = 500
    settings.WORKFLOW_MAX_ATTEMPTS = MAX_ATTEMPTS


@pytest.fixture
def customer(credentials: CustomerCredentials) -> Customer:
    return credentials.customer


# Where a workflow is on the schedule: `idle` waits on something else (a REQUESTED workflow on
# its search's callback; REVIEW, COMPLETED and FAILED are never scheduled); `due` waits for its
# turn; `in_flight` was published and nobody claimed it yet.
Place = Literal["idle", "due", "in_flight"]


def make(
    customer: Customer,
    status: str = Status.RECEIVED,
    *,
    age: dt.timedelta | None = None,
    attempts: int = 0,
    requeues: int = 0,
    place: Place = "idle",
) -> Workflow:
    """A workflow untouched for `age`; due, or published, since then when `place` says so."""
    workflow = Workflow(
        customer=customer,
        patient_id=uuid.uuid4(),
        status=status,
        attempts=attempts,
        requeues=requeues,
    )
    workflow.save()
    since = timezone.now() - (age or dt.timedelta(0))
    Workflow.objects.filter(id=workflow.id).update(
        updated_at=since,
        due_at=since if place == "due" else None,
        published_at=since if place == "in_flight" else None,
    )
    return Workflow.objects.get(id=workflow.id)


def backdate(workflow: Workflow, age: dt.timedelta) -> None:
    Workflow.objects.filter(id=workflow.id).update(updated_at=timezone.now() - age)


STALE = dt.timedelta(seconds=STALE_AFTER + 60)


def snapshot(workflow: Workflow) -> tuple[Any, ...]:
    row = Workflow.objects.get(id=workflow.id)
    return (
        row.status,
        row.attempts,
        row.requeues,
        row.updated_at,
        row.reason,
        row.due_at,
        row.published_at,
        row.claim_id,
        row.claimed_until,
        row.transitions.count(),
        row.deliveries.count(),
    )


def made_due(
    workflow: Workflow,
    *,
    since: dt.datetime,
    actor: str = "sweep",
    reason: str = SWEEP_REASON,
    requeues: int = 1,
) -> Workflow:
    """The workflow as the sweep (or an operator) left it: due now, not in flight, no claim,
    counted once more, one timeline line saying so; its status and attempts unchanged."""
    row = Workflow.objects.get(id=workflow.id)
    assert row.status == workflow.status
    assert (row.attempts, row.requeues) == (workflow.attempts, requeues)
    assert row.due_at is not None
    assert since <= row.due_at <= timezone.now()
    assert row.updated_at == row.due_at
    assert (row.published_at, row.claim_id, row.claimed_until) == (None, None, None)
    last = row.transitions.order_by("id").last()
    assert last is not None
    assert (last.source, last.target, last.actor, last.reason) == (
        workflow.status,
        workflow.status,
        actor,
        reason,
    )
    return row


def claimed(workflow: Workflow, *, lease_ends_in: dt.timedelta) -> None:
    """Claimed by a consumer (so in flight), its lease ending in `lease_ends_in`."""
    Workflow.objects.filter(id=workflow.id).update(
        claim_id=uuid.uuid4(),
        claimed_until=timezone.now() + lease_ends_in,
        due_at=None,
        published_at=timezone.now() - STALE,
    )


def tick() -> scheduler.Tick:
    """One tick of the scheduler on this test's connection (its transaction)."""
    connection.ensure_connection()
    return scheduler.schedule_tick(connection.connection)


# --- the sweep: what it makes due -------------------------------------------------------------


@pytest.fixture
def async_standin(settings: Any) -> Iterator[StandinServer]:
    """The stand-in as an asynchronous internal system whose jobs stay pending and that sends
    no callback: what leaves a workflow REQUESTED, waiting on nothing that will come."""
    settings.INTERNAL_SEARCH_ASYNC = True
    settings.INTERNAL_CALLBACK_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    server = make_server("127.0.0.1", 0, async_delay_ms=-1)
    settings.INTERNAL_SEARCH_URL = server.base_url
    with serving(server):
        yield server


def test_an_idle_requested_workflow_is_made_due_and_the_scheduler_publishes_it(
    api: LinkClient, async_standin, redis_db, django_capture_on_commit_callbacks
):
    workflow_id = api.post_link(link_body()).json()["workflow-id"]
    assert link_process(workflow_id=workflow_id).retry_in is None
    workflow = Workflow.objects.get(id=workflow_id)
    # Its search is a job now, and its callback never comes: it waits on nothing.
    assert (workflow.status, workflow.attempts) == (Status.REQUESTED, 1)
    assert (workflow.due_at, workflow.published_at, workflow.claim_id) == (None, None, None)
    search_id = workflow.search_id
    assert search_id

    assert workflows_reconcile() == ReconcileReport()  # not for the stale window yet
    backdate(workflow, STALE)
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        report = workflows_reconcile()
    assert report.as_dict() == {**NOTHING_TO_DO, "requeued": [str(workflow.id)]}
    made_due(workflow, since=before)
    # The sweep publishes nothing, now or after its commit.
    assert callbacks == []
    assert broker_messages(redis_db) == []

    # The scheduler publishes it in its turn; the consumer polls the job, not a new search.
    assert tick().published == [str(workflow.id)]
    assert queued_workflow_ids(broker_messages(redis_db)) == [str(workflow.id)]
    assert link_process(workflow_id=workflow.id).retry_in is None
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.attempts, row.search_id) == (Status.REQUESTED, 2, search_id)
    assert (row.due_at, row.published_at) == (None, None)


def test_a_due_workflow_older_than_the_stale_window_is_left_to_the_scheduler(
    api: LinkClient, redis_db
):
    # Accepted long ago and still waiting for its turn (a long backlog): due, never stale.
    workflow = Workflow.objects.get(id=api.post_link(link_body()).json()["workflow-id"])
    assert workflow.due_at is not None and workflow.published_at is None
    long_ago = timezone.now() - 10 * STALE
    Workflow.objects.filter(id=workflow.id).update(updated_at=long_ago, due_at=long_ago)
    before = snapshot(workflow)
    assert workflows_reconcile() == ReconcileReport()
    assert workflows_reconcile(stale_after_seconds=0) == ReconcileReport()
    assert workflows_reconcile(dry_run=True) == ReconcileReport()
    assert snapshot(workflow) == before
    assert broker_messages(redis_db) == []


@pytest.mark.parametrize("status", SWEPT_STATES)
def test_due_work_is_never_made_due_again_however_old(customer, status):
    due_now = make(customer, status, age=10 * STALE, attempts=1, place="due")
    backoff = make(customer, status, age=10 * STALE, attempts=MAX_ATTEMPTS - 1)
    # A retry's backoff: due later, untouched since its put-back.
    Workflow.objects.filter(id=backoff.id).update(due_at=timezone.now() + dt.timedelta(hours=1))
    before = [snapshot(due_now), snapshot(backoff)]
    assert workflows_reconcile(stale_after_seconds=0) == ReconcileReport()
    assert [snapshot(due_now), snapshot(backoff)] == before


@pytest.mark.parametrize(
    "published_ago", [dt.timedelta(seconds=10), STALE], ids=["recently", "long-ago"]
)
def test_an_in_flight_unclaimed_workflow_is_not_requeued(customer, redis_db, published_ago):
    # Due for long (updated long ago), published by the scheduler, not claimed yet. Should its
    # message be lost, that is the scheduler's to take back (RECOVER), not the sweep's.
    workflow = make(customer, Status.IN_PROGRESS, age=10 * STALE, attempts=1)
    Workflow.objects.filter(id=workflow.id).update(published_at=timezone.now() - published_ago)
    before = snapshot(workflow)
    assert workflows_reconcile() == ReconcileReport()
    assert workflows_reconcile(stale_after_seconds=0) == ReconcileReport()
    assert workflows_reconcile(dry_run=True) == ReconcileReport()
    assert snapshot(workflow) == before
    assert broker_messages(redis_db) == []


def test_fresh_idle_workflows_are_left_alone(customer, redis_db):
    fresh = make(customer, Status.REQUESTED, age=dt.timedelta(seconds=STALE_AFTER - 60))
    brand_new = make(customer, Status.REQUESTED)
    stale = make(customer, Status.REQUESTED, age=STALE)
    before = [snapshot(fresh), snapshot(brand_new)]
    since = timezone.now()
    report = workflows_reconcile()
    assert (report.requeued, report.failed) == ([stale.id], [])
    assert [snapshot(fresh), snapshot(brand_new)] == before
    made_due(stale, since=since)
    assert broker_messages(redis_db) == []


def test_a_workflow_made_due_is_not_made_due_again(customer):
    workflow = make(customer, age=STALE)
    assert workflows_reconcile().requeued == [workflow.id]
    after = snapshot(workflow)
    # Due now: waiting for its turn, however long, is not stale.
    assert workflows_reconcile() == ReconcileReport()
    assert workflows_reconcile(stale_after_seconds=0) == ReconcileReport()
    assert snapshot(workflow) == after


def test_stale_after_can_be_given_per_run(customer):
    workflow = make(customer, age=dt.timedelta(seconds=30))
    assert workflows_reconcile().requeued == []
    assert workflows_reconcile(stale_after_seconds=10).requeued == [workflow.id]


@pytest.mark.parametrize("status", SWEPT_STATES)
def test_every_idle_pending_state_but_review_is_made_due(customer, status):
    workflow = make(customer, status, age=STALE, attempts=1)
    since = timezone.now()
    assert workflows_reconcile().requeued == [workflow.id]
    made_due(workflow, since=since)


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
    assert (row.due_at, row.published_at) == (None, None)
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


def test_dry_run_changes_nothing(customer, redis_db, django_capture_on_commit_callbacks):
    stale = make(customer, age=STALE)
    spent = make(customer, Status.IN_PROGRESS, age=STALE, attempts=MAX_ATTEMPTS)
    late = make(customer, age=dt.timedelta(seconds=1), place="due")
    Workflow.objects.filter(id=late.id).update(deadline_at=timezone.now() - dt.timedelta(days=1))
    waiting = make(customer, age=10 * STALE, place="due")
    everything = [stale, spent, late, waiting]
    before = [snapshot(w) for w in everything]
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        report = workflows_reconcile(dry_run=True)
    assert report.requeued == [stale.id]
    assert sorted(report.failed) == sorted([spent.id, late.id])
    assert callbacks == []
    assert broker_messages(redis_db) == []
    assert [snapshot(w) for w in everything] == before
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
    assert (row.due_at, row.published_at) == (None, None)  # off the schedule
    last = row.transitions.last()
    assert last is not None
    assert (last.source, last.target, last.actor) == ("IN_PROGRESS", "FAILED", "sweep")
    delivery = WebhookDelivery.objects.get(workflow=workflow)
    assert (delivery.event_type, delivery.status) == ("link.failed", DeliveryStatus.PENDING)
    assert row.reason in delivery.payload
    # The customer is told (a webhook task), the workflow is not processed again.
    assert queued_delivery_ids(broker_messages(redis_db)) == [delivery.id]


def test_one_below_the_limit_is_still_made_due(customer):
    workflow = make(
        customer,
        Status.IN_PROGRESS,
        age=STALE,
        attempts=MAX_ATTEMPTS - 1,
        requeues=MAX_ATTEMPTS - 1,
    )
    since = timezone.now()
    assert workflows_reconcile().requeued == [workflow.id]
    made_due(workflow, since=since, requeues=MAX_ATTEMPTS)


def test_attempt_limit_is_a_setting(customer, settings):
    settings.WORKFLOW_MAX_ATTEMPTS = 2
    workflow = make(customer, Status.IN_PROGRESS, age=STALE, attempts=2)
    below = make(customer, Status.IN_PROGRESS, age=STALE, attempts=1)
    report = workflows_reconcile()
    assert (report.failed, report.requeued) == ([workflow.id], [below.id])


def test_requeues_that_found_nothing_to_do_cost_no_attempt(customer):
    # Made due many times, never attempted: only processing attempts approach the cap, so it
    # is made due again, not failed.
    workflow = make(customer, age=STALE, attempts=0, requeues=MAX_ATTEMPTS * 3)
    since = timezone.now()
    report = workflows_reconcile()
    assert (report.requeued, report.failed) == ([workflow.id], [])
    made_due(workflow, since=since, requeues=MAX_ATTEMPTS * 3 + 1)


def test_a_claim_whose_lease_holds_is_neither_requeued_nor_counted_nor_failed(customer):
    # A consumer is on it (its heartbeat renews the lease), however long ago it changed; even
    # past its deadline, the consumer ends it.
    workflow = make(customer, Status.IN_PROGRESS, age=STALE, attempts=MAX_ATTEMPTS - 1)
    claimed(workflow, lease_ends_in=dt.timedelta(seconds=30))
    late = make(customer, Status.IN_PROGRESS, age=STALE, attempts=1)
    claimed(late, lease_ends_in=dt.timedelta(seconds=30))
    Workflow.objects.filter(id=late.id).update(deadline_at=timezone.now() - dt.timedelta(days=1))
    before = [snapshot(workflow), snapshot(late)]
    for _ in range(MAX_ATTEMPTS + 1):
        assert workflows_reconcile() == ReconcileReport()
    assert workflows_reconcile(dry_run=True) == ReconcileReport()
    assert [snapshot(workflow), snapshot(late)] == before


def test_a_claim_whose_lease_ended_is_the_schedulers_to_take_back(customer, monkeypatch):
    # Its worker stopped renewing the claim: the scheduler's RECOVER takes it back, due again
    # at once; the sweep leaves it, however long ago it changed.
    workflow = make(customer, Status.IN_PROGRESS, age=STALE, attempts=1)
    claimed(workflow, lease_ends_in=-dt.timedelta(seconds=5))
    before = snapshot(workflow)
    assert workflows_reconcile() == ReconcileReport()
    assert workflows_reconcile(dry_run=True) == ReconcileReport()
    assert snapshot(workflow) == before

    monkeypatch.setattr(scheduler, "_last_recover", float("-inf"))
    assert tick().recovered == 1
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.attempts, row.requeues, row.claim_id) == (
        Status.IN_PROGRESS,
        1,
        1,
        None,
    )
    last = row.transitions.order_by("id").last()
    assert last is not None
    assert last.actor == "scheduler"
    assert not row.transitions.filter(actor="sweep").exists()


def test_terminal_workflows_are_never_touched(customer, redis_db):
    done = make(customer, Status.COMPLETED, age=dt.timedelta(days=3), attempts=9, requeues=9)
    failed = make(customer, Status.FAILED, age=dt.timedelta(days=3), attempts=9, requeues=9)
    Workflow.objects.filter(id__in=[done.id, failed.id]).update(
        deadline_at=timezone.now() - dt.timedelta(days=2)
    )
    before = [snapshot(done), snapshot(failed)]
    report = workflows_reconcile(stale_after_seconds=0)
    assert (report.requeued, report.failed) == ([], [])
    assert [snapshot(done), snapshot(failed)] == before
    assert broker_messages(redis_db) == []


# --- the sweep: batches ------------------------------------------------------------------------


def test_small_batches_still_cover_everything_oldest_first(customer, settings):
    settings.RECONCILE_BATCH_SIZE = 4
    workflows = [make(customer, age=STALE + dt.timedelta(seconds=i)) for i in range(25)]
    since = timezone.now()
    report = workflows_reconcile()
    assert sorted(report.requeued) == sorted(w.id for w in workflows)
    assert report.requeued == [w.id for w in reversed(workflows)]
    for workflow in workflows:
        made_due(workflow, since=since)


def test_one_run_is_capped_and_the_next_run_continues(customer, settings):
    settings.RECONCILE_BATCH_SIZE = 1
    workflows = [make(customer, age=STALE) for _ in range(MAX_BATCHES_PER_RUN + 3)]
    first = workflows_reconcile()
    assert len(first.requeued) == MAX_BATCHES_PER_RUN
    assert Workflow.objects.filter(due_at__isnull=True).count() == 3
    second = workflows_reconcile()
    assert sorted(first.requeued + second.requeued) == sorted(w.id for w in workflows)
    assert set(Workflow.objects.values_list("requeues", flat=True)) == {1}


def test_a_backlog_of_due_work_takes_no_room_in_the_sweeps_batches(customer, settings):
    settings.RECONCILE_BATCH_SIZE = 2
    long_ago = timezone.now() - 10 * STALE
    # Older than every idle one: were the due rows in the sweep's batches, the cap would be
    # spent on them before the idle ones.
    Workflow.objects.bulk_create(
        Workflow(customer=customer, patient_id=uuid.uuid4(), due_at=long_ago, updated_at=long_ago)
        for _ in range(2 * MAX_BATCHES_PER_RUN + 1)
    )
    idle = [make(customer, Status.REQUESTED, age=STALE) for _ in range(3)]
    report = workflows_reconcile()
    assert (sorted(report.requeued), report.failed) == (sorted(w.id for w in idle), [])
    assert Workflow.objects.filter(requeues=0).count() == 2 * MAX_BATCHES_PER_RUN + 1


def test_dry_run_reports_what_a_real_run_does(customer, settings):
    settings.RECONCILE_BATCH_SIZE = 4
    for _ in range(10):
        make(customer, age=STALE)
    for _ in range(3):
        make(customer, Status.IN_PROGRESS, age=STALE, attempts=MAX_ATTEMPTS)
    for _ in range(3):
        make(customer, age=10 * STALE, place="due")
    dry = workflows_reconcile(dry_run=True)
    real = workflows_reconcile()
    assert (len(dry.requeued), len(dry.failed)) == (10, 3)
    assert sorted(dry.requeued) == sorted(real.requeued)
    assert sorted(dry.failed) == sorted(real.failed)


@pytest.mark.django_db(transaction=True)
def test_concurrent_sweeps_make_each_workflow_due_exactly_once(settings, redis_db):
    settings.RECONCILE_BATCH_SIZE = 10
    now = timezone.now()
    # 8 customers x 25 idle workflows, each customer's rows next to each other in age, so that
    # two sweeps really interleave (see test_sweep_skips_only_locked_workflows for why it
    # matters).
    customers = [new_customer(f"Clinic {i}").customer for i in range(8)]
    Workflow.objects.bulk_create(
        Workflow(
            customer=customers[i // 25],
            patient_id=uuid.uuid4(),
            status=Status.REQUESTED,
            updated_at=now - dt.timedelta(hours=2, seconds=-i),
            created_at=now - dt.timedelta(hours=3),
            due_at=None,
            published_at=None,
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
    assert set(sweep_rows.values_list("reason", flat=True)) == {SWEEP_REASON}
    assert set(Workflow.objects.values_list("requeues", flat=True)) == {1}
    assert not Workflow.objects.filter(due_at__isnull=True).exists()
    assert not Workflow.objects.filter(published_at__isnull=False).exists()
    assert broker_messages(redis_db) == []  # the scheduler publishes, in its turn


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
    busy = make(customer, Status.REQUESTED, age=STALE + dt.timedelta(minutes=1))
    others = [
        make(other.customer, Status.REQUESTED, age=STALE)
        for other in (new_customer("B"), new_customer("C"))
    ]
    before = snapshot(busy)
    with held(lambda: Workflow.objects.select_for_update().get(id=busy.id)):
        report = workflows_reconcile()
    assert sorted(report.requeued) == sorted(w.id for w in others)
    assert snapshot(busy) == before
    # Once the lock is gone, the next run makes it due.
    assert workflows_reconcile().requeued == [busy.id]


@pytest.mark.django_db(transaction=True)
def test_sweep_skips_only_locked_workflows(customer):
    # The consumer's lock takes the customer's row too (select_related): the sweep must not
    # lock customers, or that would hide every other workflow of theirs.
    busy = make(customer, Status.IN_PROGRESS)
    stale = [make(customer, age=STALE) for _ in range(3)]
    consumer = Workflow.objects.select_for_update().select_related("customer")
    with held(lambda: consumer.get(id=busy.id)):
        report = workflows_reconcile()
    assert sorted(report.requeued) == sorted(w.id for w in stale)


# --- the operator's re-queue ------------------------------------------------------------------


def test_requeue_failed_workflow_starts_it_afresh_due_now(
    customer, redis_db, django_capture_on_commit_callbacks
):
    workflow = make(customer, Status.IN_PROGRESS, attempts=MAX_ATTEMPTS, requeues=3)
    workflow = workflow_mark_failed(workflow_id=workflow.id, actor="test", reason="stuck")
    Workflow.objects.filter(id=workflow.id).update(
        claim_id=uuid.uuid4(), claimed_until=timezone.now(), published_at=timezone.now()
    )
    assert Workflow.objects.get(id=workflow.id).due_at is None
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        result = workflow_requeue(workflow_id=workflow.id, actor="operator:ops", reason="INC-7")
    assert result.status == Status.RECEIVED
    row = Workflow.objects.get(id=workflow.id)
    assert (row.status, row.attempts, row.requeues, row.reason, row.result) == (
        Status.RECEIVED,
        0,
        0,
        "",
        None,
    )
    assert (row.claim_id, row.claimed_until, row.published_at) == (None, None, None)
    assert row.due_at is not None
    assert before <= row.due_at <= timezone.now()
    last = row.transitions.last()
    assert last is not None
    assert (last.source, last.target, last.actor, last.reason) == (
        "FAILED",
        "RECEIVED",
        "operator:ops",
        "INC-7",
    )
    # Nothing is published by it: the scheduler publishes due work in its turn.
    assert callbacks == []
    assert broker_messages(redis_db) == []
    assert tick().published == [str(workflow.id)]


def due_later(workflow: Workflow) -> None:
    """Put back after a transient failure: due after its backoff."""
    Workflow.objects.filter(id=workflow.id).update(due_at=timezone.now() + dt.timedelta(hours=1))


def in_flight_with_a_dead_claim(workflow: Workflow) -> None:
    claimed(workflow, lease_ends_in=-dt.timedelta(seconds=5))


@pytest.mark.parametrize(
    ("status", "place", "then"),
    [
        (Status.REQUESTED, "idle", None),
        (Status.IN_PROGRESS, "in_flight", None),
        (Status.IN_PROGRESS, "idle", in_flight_with_a_dead_claim),
        (Status.IN_PROGRESS, "idle", due_later),
        (Status.RECEIVED, "due", None),
    ],
    ids=["idle", "published-unclaimed", "dead-claim", "due-later", "due-now"],
)
def test_requeue_pending_workflow_makes_it_due_now_and_publishes_nothing(
    customer, redis_db, django_capture_on_commit_callbacks, status, place, then
):
    workflow = make(customer, status, attempts=2, age=dt.timedelta(hours=1), place=place)
    if then is not None:
        then(workflow)
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        workflow_requeue(workflow_id=workflow.id, actor="operator:ops")
    made_due(workflow, since=before, actor="operator:ops", reason=OPERATOR_REASON)
    assert callbacks == []
    assert broker_messages(redis_db) == []


def test_requeue_pending_workflow_keeps_its_reason(customer):
    workflow = make(customer, Status.REQUESTED, age=dt.timedelta(hours=1))
    before = timezone.now()
    workflow_requeue(workflow_id=workflow.id, actor="operator:ops", reason="INC-8")
    made_due(workflow, since=before, actor="operator:ops", reason="INC-8")


def test_an_operators_requeue_of_a_live_claim_is_refused_and_changes_nothing(customer):
    workflow = make(customer, Status.IN_PROGRESS, age=STALE, attempts=1)
    claimed(workflow, lease_ends_in=dt.timedelta(seconds=30))
    held_by = Workflow.objects.get(id=workflow.id)
    with pytest.raises(ValueError, match="being worked on by a worker"):
        workflow_requeue(workflow_id=workflow.id, actor="ops")
    row = Workflow.objects.get(id=workflow.id)
    assert row.requeues == held_by.requeues
    assert row.transitions.filter(actor="ops").count() == 0
    # Its consumer is on it: not made due (that would run it twice), still in flight.
    assert (row.status, row.attempts) == (Status.IN_PROGRESS, 1)
    assert (row.claim_id, row.claimed_until) == (held_by.claim_id, held_by.claimed_until)
    assert (row.due_at, row.published_at) == (None, held_by.published_at)


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
    assert (row.due_at, row.published_at) == (None, None)


def test_sweep_survives_a_requeued_workflow_running_out_of_attempts(customer):
    relapsed = make(customer, Status.IN_PROGRESS)
    workflow_mark_failed(workflow_id=relapsed.id, actor="operator:ops", reason="first")
    workflow_requeue(workflow_id=relapsed.id, actor="operator:ops")
    # Run again to its last attempt, which left it waiting on a search job's callback.
    Workflow.objects.filter(id=relapsed.id).update(
        status=Status.REQUESTED, attempts=MAX_ATTEMPTS, due_at=None
    )
    backdate(relapsed, STALE + dt.timedelta(minutes=5))  # the oldest: first in the batch
    other = make(customer, age=STALE)
    report = workflows_reconcile()
    assert report.failed == [relapsed.id]
    assert report.requeued == [other.id]
    assert Workflow.objects.get(id=relapsed.id).status == Status.FAILED
    assert Workflow.objects.get(id=other.id).requeues == 1
