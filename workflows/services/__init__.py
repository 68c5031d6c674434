"""Workflow use cases shared by every request type."""

from workflows.services.reconcile import (
    ReconcileReport,
    workflow_mark_failed,
    workflow_requeue,
    workflows_reconcile,
)
from workflows.services.webhooks import (
    webhook_deliveries_attempt,
    webhook_deliveries_settle,
    webhook_deliveries_start,
    webhook_delivery_attempt,
    webhook_delivery_new,
    webhook_dispatch_due,
    webhook_event_create,
    webhook_redeliver,
)
from workflows.services.workflows import (
    Saved,
    Step,
    WorkflowChange,
    workflow_announcement,
    workflow_claim,
    workflow_finish,
    workflow_publish,
    workflow_release,
    workflow_transition,
    workflows_claim,
    workflows_publish,
    workflows_save,
)

__all__ = [
    "ReconcileReport",
    "Saved",
    "Step",
    "WorkflowChange",
    "webhook_deliveries_attempt",
    "webhook_deliveries_settle",
    "webhook_deliveries_start",
    "webhook_delivery_attempt",
    "webhook_delivery_new",
    "webhook_dispatch_due",
    "webhook_event_create",
    "webhook_redeliver",
    "workflow_announcement",
    "workflow_claim",
    "workflow_finish",
    "workflow_mark_failed",
    "workflow_publish",
    "workflow_release",
    "workflow_requeue",
    "workflow_transition",
    "workflows_claim",
    "workflows_publish",
    "workflows_reconcile",
    "workflows_save",
]
