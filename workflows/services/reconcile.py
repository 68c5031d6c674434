"""The reconciliation sweep, and the operator's re-queue.

The scheduler (workflows/scheduler.py) runs everything that is due and takes back work in
flight that nobody is doing. The sweep, run by beat every RECONCILE_INTERVAL_SECONDS, keeps the
promise's bounds on the rest: it fails what passed its deadline, ends the reviews nobody
decided, and makes due what waits on nothing (an asynchronous search whose callback never came:
the consumer then polls it). It never publishes.
"""

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from workflows import metrics
from workflows.models import PENDING_STATES, SWEPT_STATES, Status, Workflow, WorkflowTransition
from workflows.services.workflows import (
    DEADLINE_EXCEEDED,
    Step,
    workflow_finish,
    workflow_past_deadline,
    workflow_transition,
)

logger = logging.getLogger(__name__)

SWEEP_ACTOR = "sweep"
# One sweep run handles at most this many batches, so a huge backlog cannot pin beat's task.
MAX_BATCHES_PER_RUN = 20


# What the customer reads on a review that ran out of time (and the timeline's reason).
REVIEW_EXPIRED = "review expired"


@dataclass
class ReconcileReport:
    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)  # out of attempts, or past deadline
    expired: list[uuid.UUID] = field(default_factory=list)  # reviews ended, no match

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "requeued": [str(i) for i in self.requeued],
            "failed": [str(i) for i in self.failed],
            "expired": [str(i) for i in self.expired],
        }


def workflows_reconcile(
    *,
    now: dt.datetime | None = None,
    stale_after_seconds: int | None = None,
    dry_run: bool = False,
) -> ReconcileReport:
    """Fail the pending workflows past their deadline; make due those that wait on nothing.

    Past its deadline (WORKFLOW_DEADLINE_SECONDS), a workflow no live claim holds is FAILED,
    "deadline exceeded", whether it is due, waiting for the internal system, or in the queue.
    One that is neither due nor in flight nor claimed (a REQUESTED workflow whose search's
    callback never came) is made due once untouched for `stale_after`
    (RECONCILE_STALE_AFTER_SECONDS): the consumer then polls its search job; out of attempts
    it is FAILED instead. Only processing attempts (the consumers' claims) count towards
    WORKFLOW_MAX_ATTEMPTS. Work due or in flight is the scheduler's: waiting one's turn is not
    stale.

    REVIEW ones wait
    for their reviewer (an operator, or the customer) up to REVIEW_TIMEOUT_SECONDS after they
    entered review; then the sweep ends them COMPLETED with no match, "review expired", and the
    customer's webhook is queued with the ending.

    Rows are taken with FOR UPDATE SKIP LOCKED and touched inside the same transaction, so two
    sweeps running at once (two beats by mistake) never make one workflow due twice.
    """
    now = now or timezone.now()
    stale_after = (
        stale_after_seconds
        if stale_after_seconds is not None
        else settings.RECONCILE_STALE_AFTER_SECONDS
    )
    cutoff = now - dt.timedelta(seconds=stale_after)
    if dry_run:
        return _reconcile_preview(cutoff, now)
    report = ReconcileReport()
    for _ in range(MAX_BATCHES_PER_RUN):
        with transaction.atomic():
            batch = list(
                # of=self: the customer row (select_related) stays unlocked, or a consumer
                # holding one workflow would hide all its customer's workflows from the sweep.
                Workflow.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("customer")
                .filter(_stale(cutoff, now), status__in=SWEPT_STATES)
                .order_by("updated_at")[: settings.RECONCILE_BATCH_SIZE]
            )
            requeued = []
            for workflow in batch:
                reason = _fail_reason(workflow, now)
                if reason:
                    report.failed.append(workflow.id)
                    workflow_finish(
                        workflow=workflow, name="fail", actor=SWEEP_ACTOR, reason=reason
                    )
                else:
                    requeued.append(workflow)
            report.requeued += [workflow.id for workflow in requeued]
            _requeue_pending(
                requeued,
                now=now,
                actor=SWEEP_ACTOR,
                reason="due again: made due by the reconciliation sweep",
            )
        if len(batch) < settings.RECONCILE_BATCH_SIZE:
            break
    report.expired = _reviews_expire(now)
    if report.requeued or report.failed or report.expired:
        logger.info(
            "reconcile: %d re-queued, %d failed, %d reviews expired",
            len(report.requeued),
            len(report.failed),
            len(report.expired),
        )
    metrics.reconcile_ran(requeued=len(report.requeued), failed=len(report.failed))
    return report


def _reviews_expire(now: dt.datetime) -> list[uuid.UUID]:
    """End the reviews nobody decided within REVIEW_TIMEOUT_SECONDS: COMPLETED, no match. A
    review being decided right now holds its row lock and is skipped (the decision wins)."""
    cutoff = now - dt.timedelta(seconds=settings.REVIEW_TIMEOUT_SECONDS)
    expired: list[uuid.UUID] = []
    for _ in range(MAX_BATCHES_PER_RUN):
        with transaction.atomic():
            batch = list(
                Workflow.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("customer")
                .filter(status=Status.REVIEW, updated_at__lt=cutoff)
                .order_by("updated_at")[: settings.RECONCILE_BATCH_SIZE]
            )
            for workflow in batch:
                workflow_finish(
                    workflow=workflow,
                    name="complete",
                    actor=SWEEP_ACTOR,
                    first=[Step("mark_no_results", REVIEW_EXPIRED)],
                )
                expired.append(workflow.id)
        if len(batch) < settings.RECONCILE_BATCH_SIZE:
            break
    return expired


def _stale(cutoff: dt.datetime, now: dt.datetime) -> Q:
    """No live claim holds it, and either it passed its deadline, or it waits on nothing (not
    due, not in flight) since `cutoff`."""
    unclaimed = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    deadline = dt.timedelta(seconds=settings.WORKFLOW_DEADLINE_SECONDS)
    past_deadline = Q(deadline_at__lte=now) | Q(
        deadline_at__isnull=True, created_at__lt=now - deadline
    )
    idle = Q(due_at__isnull=True, published_at__isnull=True, updated_at__lt=cutoff)
    return unclaimed & (past_deadline | idle)


def _fail_reason(workflow: Workflow, now: dt.datetime) -> str:
    """Why a stale workflow is failed instead of re-queued; "" to re-queue it. Past its
    deadline (WORKFLOW_DEADLINE_SECONDS), or out of attempts: the last attempt died (it is
    stale), and another would be one too many."""
    if workflow_past_deadline(workflow=workflow, now=now):
        return DEADLINE_EXCEEDED
    if workflow.attempts >= settings.WORKFLOW_MAX_ATTEMPTS:
        return (
            f"attempt limit reached ({workflow.attempts} attempts, {workflow.requeues} re-queues)"
        )
    return ""


def _reconcile_preview(cutoff: dt.datetime, now: dt.datetime) -> ReconcileReport:
    """What a sweep would do now, changing nothing (bounded like a real run)."""
    limit = settings.RECONCILE_BATCH_SIZE * MAX_BATCHES_PER_RUN
    review_cutoff = now - dt.timedelta(seconds=settings.REVIEW_TIMEOUT_SECONDS)
    report = ReconcileReport(
        expired=list(
            Workflow.objects.filter(status=Status.REVIEW, updated_at__lt=review_cutoff)
            .order_by("updated_at")
            .values_list("id", flat=True)[:limit]
        )
    )
    stale = Workflow.objects.filter(_stale(cutoff, now), status__in=SWEPT_STATES).order_by(
        "updated_at"
    )[:limit]
    for workflow in stale.only("id", "attempts", "requeues", "created_at", "deadline_at"):
        (report.failed if _fail_reason(workflow, now) else report.requeued).append(workflow.id)
    return report


def _requeue_pending(
    workflows: list[Workflow], *, now: dt.datetime, actor: str, reason: str
) -> None:
    """Make each due now, count and record it (caller holds the transaction and the rows'
    locks); the scheduler publishes it in its turn. No live claim holds any of them (the sweep
    takes only those, an operator's re-queue refuses the others); a dead claim is dropped, and
    should its old worker only have paused, its next renewal finds the claim gone and drops the
    work. Three statements, whatever the number."""
    if not workflows:
        return
    Workflow.objects.filter(id__in=[workflow.id for workflow in workflows]).update(
        requeues=F("requeues") + 1,
        updated_at=now,
        due_at=now,
        published_at=None,
        claim_id=None,
        claimed_until=None,
    )
    for workflow in workflows:
        workflow.requeues += 1
        workflow.updated_at = workflow.due_at = now
        workflow.claim_id = workflow.claimed_until = workflow.published_at = None
    WorkflowTransition.objects.bulk_create(
        WorkflowTransition(
            workflow=workflow,
            source=workflow.status,
            target=workflow.status,
            actor=actor,
            reason=reason,
            at=now,
        )
        for workflow in workflows
    )


def workflow_requeue(*, workflow_id: uuid.UUID, actor: str, reason: str = "") -> Workflow:
    """An operator's re-queue: FAILED -> RECEIVED, due at once; a pending one no consumer holds
    is made due at once (the scheduler publishes it in its turn); one a live claim holds is
    refused (its worker is on it).

    Raises Workflow.DoesNotExist, or ValueError when it cannot be re-queued (COMPLETED, waiting
    for an operator's review, or a newer request for the same patient is pending).
    """
    with transaction.atomic():
        workflow = Workflow.objects.select_for_update().get(id=workflow_id)
        if workflow.status == Status.COMPLETED:
            raise ValueError(f"workflow {workflow_id} is COMPLETED; nothing to re-queue")
        if workflow.status == Status.REVIEW:
            # A machine must not overtake the person: resolve the review instead.
            raise ValueError(f"workflow {workflow_id} awaits review; resolve the review instead")
        if workflow.status != Status.FAILED:
            if workflow.claimed_until is not None and workflow.claimed_until >= timezone.now():
                # Its consumer is on it: making it due would run it twice.
                raise ValueError(
                    f"workflow {workflow_id} is being worked on by a worker (its claim runs "
                    f"until {workflow.claimed_until:%H:%M:%S} UTC unless renewed); "
                    "nothing to re-queue"
                )
            _requeue_pending(
                [workflow],
                now=timezone.now(),
                actor=actor,
                reason=reason or "made due by an operator",
            )
            return workflow
        newer = (
            Workflow.objects.filter(
                customer_id=workflow.customer_id,
                patient_id=workflow.patient_id,
                status__in=PENDING_STATES,
            )
            .values_list("id", flat=True)
            .first()
        )
        if newer is not None:
            # One pending workflow per patient is a database rule: refuse it plainly.
            raise ValueError(
                f"workflow {workflow_id}: a newer request for this patient is pending "
                f"(workflow {newer})"
            )
        workflow = workflow_transition(
            workflow=workflow,
            name="requeue",
            actor=actor,
            reason=reason or "re-queued by an operator",
            deadline_at=timezone.now() + dt.timedelta(seconds=settings.WORKFLOW_DEADLINE_SECONDS),
        )
    return workflow


def workflow_mark_failed(*, workflow_id: uuid.UUID, actor: str, reason: str) -> Workflow:
    """An operator stops a pending workflow (the seed's wildcard); the customer is told."""
    if not reason.strip():
        raise ValueError("a reason is required")
    with transaction.atomic():
        workflow = (
            Workflow.objects.select_for_update(of=("self",))
            .select_related("customer")
            .get(id=workflow_id)
        )
        return workflow_finish(workflow=workflow, name="fail", actor=actor, reason=reason)
