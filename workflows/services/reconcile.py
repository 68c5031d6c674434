"""Reconciliation (seed section 4.1) and the operator's re-queue."""

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from workflows.models import PENDING_STATES, Status, Workflow, WorkflowTransition
from workflows.services.workflows import workflow_finish, workflow_publish, workflow_transition

logger = logging.getLogger(__name__)

SWEEP_ACTOR = "sweep"
# One sweep run handles at most this many batches, so a huge backlog cannot pin beat's task.
MAX_BATCHES_PER_RUN = 20


@dataclass
class ReconcileReport:
    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "requeued": [str(i) for i in self.requeued],
            "failed": [str(i) for i in self.failed],
        }


def workflows_reconcile(
    *,
    now: dt.datetime | None = None,
    stale_after_seconds: int | None = None,
    dry_run: bool = False,
) -> ReconcileReport:
    """Re-queue pending workflows untouched for too long; fail those out of attempts.

    Rows are taken with FOR UPDATE SKIP LOCKED and touched inside the same transaction, so two
    sweeps running at once (two beats by mistake) never dispatch one workflow twice.
    """
    now = now or timezone.now()
    stale_after = (
        stale_after_seconds
        if stale_after_seconds is not None
        else settings.RECONCILE_STALE_AFTER_SECONDS
    )
    cutoff = now - dt.timedelta(seconds=stale_after)
    report = ReconcileReport()
    max_attempts = settings.WORKFLOW_MAX_ATTEMPTS
    for _ in range(MAX_BATCHES_PER_RUN):
        with transaction.atomic():
            batch = list(
                Workflow.objects.select_for_update(skip_locked=True)
                .select_related("customer")
                .filter(status__in=PENDING_STATES, updated_at__lt=cutoff)
                .order_by("updated_at")[: settings.RECONCILE_BATCH_SIZE]
            )
            for workflow in batch:
                out_of_attempts = (
                    workflow.attempts >= max_attempts or workflow.requeues >= max_attempts
                )
                if out_of_attempts:
                    report.failed.append(workflow.id)
                    if not dry_run:
                        workflow_finish(
                            workflow=workflow,
                            name="fail",
                            actor=SWEEP_ACTOR,
                            reason=(
                                f"attempt limit reached ({workflow.attempts} attempts, "
                                f"{workflow.requeues} re-queues)"
                            ),
                        )
                    continue
                report.requeued.append(workflow.id)
                if not dry_run:
                    _requeue_pending(
                        workflow,
                        now=now,
                        actor=SWEEP_ACTOR,
                        reason="re-queued by the reconciliation sweep",
                    )
            if dry_run:
                transaction.set_rollback(True)
                break
        if len(batch) < settings.RECONCILE_BATCH_SIZE:
            break
    if report.requeued or report.failed:
        logger.info(
            "reconcile: %d re-queued, %d failed%s",
            len(report.requeued),
            len(report.failed),
            " (dry run)" if dry_run else "",
        )
    return report


def _requeue_pending(workflow: Workflow, *, now: dt.datetime, actor: str, reason: str) -> None:
    """Touch, count and record a re-dispatch; publish after commit (caller holds the tx)."""
    workflow.requeues += 1
    workflow.updated_at = now
    workflow.save(update_fields=["requeues", "updated_at"])
    WorkflowTransition.objects.create(
        workflow=workflow,
        source=workflow.status,
        target=workflow.status,
        actor=actor,
        reason=reason,
        at=now,
    )
    transaction.on_commit(lambda: workflow_publish(workflow=workflow))


def workflow_requeue(*, workflow_id: uuid.UUID, actor: str, reason: str = "") -> Workflow:
    """An operator's re-queue: FAILED -> RECEIVED and publish; a pending one is re-published.

    Raises Workflow.DoesNotExist, or ValueError for a COMPLETED workflow.
    """
    with transaction.atomic():
        workflow = Workflow.objects.select_for_update().get(id=workflow_id)
        if workflow.status == Status.COMPLETED:
            raise ValueError(f"workflow {workflow_id} is COMPLETED; nothing to re-queue")
        if workflow.status == Status.FAILED:
            workflow = workflow_transition(
                workflow=workflow,
                name="requeue",
                actor=actor,
                reason=reason or "re-queued by an operator",
            )
            transaction.on_commit(lambda: workflow_publish(workflow=workflow))
        else:
            _requeue_pending(
                workflow,
                now=timezone.now(),
                actor=actor,
                reason=reason or "re-published by an operator",
            )
    return workflow


def workflow_mark_failed(*, workflow_id: uuid.UUID, actor: str, reason: str) -> Workflow:
    """An operator stops a pending workflow (the seed's wildcard); the customer is told."""
    if not reason.strip():
        raise ValueError("a reason is required")
    with transaction.atomic():
        workflow = (
            Workflow.objects.select_for_update().select_related("customer").get(id=workflow_id)
        )
        return workflow_finish(workflow=workflow, name="fail", actor=actor, reason=reason)
