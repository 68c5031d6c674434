"""Celery tasks: each loads by id, calls a service, and retries only on a transient error."""

import logging
import uuid
from typing import Any

from celery import shared_task

from workflows.selectors import workflows_stuck_report
from workflows.services import (
    webhook_deliveries_attempt,
    webhook_dispatch_due,
    workflows_reconcile,
)

logger = logging.getLogger(__name__)


@shared_task(name="workflows.process_workflows")
def process_workflows(workflow_ids: list[str], claims: dict[str, str] | None = None) -> None:
    """Consume one batch of workflows; the message carries their ids only.

    `claims` are our own claims on some of them, riding along a retry so that it resumes that
    work instead of waiting out the claim's lease. Each workflow that must be retried is sent
    again on its own, after its own backoff: attempts are counted in PostgreSQL, not by Celery.
    """
    from linking.services import links_process

    renew = {uuid.UUID(k): uuid.UUID(v) for k, v in (claims or {}).items()}
    for retry in links_process(workflow_ids=workflow_ids, claims=renew):
        process_workflows.apply_async(
            args=([str(retry.workflow_id)],),
            kwargs={"claims": {str(retry.workflow_id): str(retry.claim_id)}},
            countdown=retry.retry_in,
        )


@shared_task(name="workflows.process_workflow")
def process_workflow(message: dict[str, str], claim: str | None = None) -> None:
    """A message of the one-workflow format that came before batches (still queued across an
    upgrade): worked as a batch of one."""
    workflow_id = message["workflow-id"]
    process_workflows(workflow_ids=[workflow_id], claims={workflow_id: claim} if claim else None)


@shared_task(name="workflows.deliver_webhooks")
def deliver_webhooks(delivery_ids: list[int]) -> None:
    webhook_deliveries_attempt(delivery_ids=delivery_ids)


@shared_task(name="workflows.deliver_webhook")
def deliver_webhook(delivery_id: int) -> None:
    """The one-delivery message that came before batches (still queued across an upgrade)."""
    webhook_deliveries_attempt(delivery_ids=[delivery_id])


@shared_task(name="workflows.dispatch_due_webhooks")
def dispatch_due_webhooks() -> int:
    return webhook_dispatch_due()


@shared_task(name="workflows.reconcile")
def reconcile() -> dict[str, list[str]]:
    return workflows_reconcile().as_dict()


@shared_task(name="workflows.stuck_report")
def stuck_report() -> dict[str, Any]:
    report = workflows_stuck_report()
    log = logger.warning if report["total"] else logger.info
    log("stuck workflows: %s", report)
    return report
