"""Workflow use cases shared by every request type: creation, transitions, publishing."""

import logging
import uuid
from typing import Any

from django.db import transaction
from django.utils import timezone

from merchant.models import Customer
from workflows.models import RequestType, Status, Workflow, WorkflowTransition

logger = logging.getLogger(__name__)


def workflow_create(
    *,
    customer: Customer,
    patient_id: uuid.UUID,
    request_id: uuid.UUID,
    request_type: str = RequestType.LINK,
    actor: str = "api",
) -> Workflow:
    """Insert a RECEIVED workflow and the first line of its timeline (caller holds the tx)."""
    now = timezone.now()
    workflow = Workflow.objects.create(
        customer=customer,
        patient_id=patient_id,
        request_id=request_id,
        request_type=request_type,
        created_at=now,
        updated_at=now,
    )
    WorkflowTransition.objects.create(
        workflow=workflow,
        source="",
        target=Status.RECEIVED,
        actor=actor,
        at=now,
        reason="accepted",
    )
    return workflow


def workflow_transition(
    *, workflow: Workflow, name: str, actor: str, reason: str = "", **kwargs: Any
) -> Workflow:
    """Apply the transition `name`, save it and record it, atomically.

    The save is guarded by the status the row had when loaded (ConcurrentTransitionMixin), so
    a racing transition raises ConcurrentTransition and this one rolls back.
    """
    with transaction.atomic():
        source = workflow.status
        getattr(workflow, name)(reason=reason, **kwargs)
        workflow.updated_at = timezone.now()
        workflow.save()
        WorkflowTransition.objects.create(
            workflow=workflow,
            source=source,
            target=workflow.status,
            actor=actor,
            reason=reason,
            at=workflow.updated_at,
        )
    return workflow


def workflow_message(*, workflow: Workflow) -> dict[str, str]:
    """The queue message of seed section 3.3: ids only, never demographics."""
    return {
        "workflow-id": str(workflow.id),
        "request-id": str(workflow.request_id),
        "customer-id": str(workflow.customer_id),
        "patient-id": str(workflow.patient_id),
        "request-type": workflow.request_type,
    }


def workflow_publish(*, workflow: Workflow) -> bool:
    """Send the workflow's message to the queue; True if the broker took it.

    A failure is logged and swallowed: the workflow row is committed, and the reconciliation
    sweep re-publishes every pending workflow that nobody picked up.
    """
    from workflows.tasks import process_workflow

    try:
        process_workflow.apply_async(args=(workflow_message(workflow=workflow),))
    except Exception as exc:
        logger.warning(
            "publish failed for workflow %s (%s); the sweep will re-queue it",
            workflow.id,
            type(exc).__name__,
        )
        return False
    return True
