"""Workflow use cases shared by every request type."""

from workflows.services.reconcile import (
    ReconcileReport,
    workflow_mark_failed,
    workflow_requeue,
    workflows_reconcile,
)
from workflows.services.webhooks import (
    webhook_delivery_attempt,
    webhook_delivery_new,
    webhook_dispatch_due,
    webhook_event_create,
    webhook_redeliver,
)
from workflows.services.workflows import (
    Step,
    workflow_announce,
    workflow_announcement,
    workflow_claim,
    workflow_create,
    workflow_finish,
    workflow_message,
    workflow_messages_publish,
    workflow_new,
    workflow_publish,
    workflow_release,
    workflow_transition,
)

__all__ = [
    "ReconcileReport",
    "Step",
    "webhook_delivery_attempt",
    "webhook_delivery_new",
    "webhook_dispatch_due",
    "webhook_event_create",
    "webhook_redeliver",
    "workflow_announce",
    "workflow_announcement",
    "workflow_claim",
    "workflow_create",
    "workflow_finish",
    "workflow_mark_failed",
    "workflow_message",
    "workflow_messages_publish",
    "workflow_new",
    "workflow_publish",
    "workflow_release",
    "workflow_requeue",
    "workflow_transition",
    "workflows_reconcile",
]
