"""Celery tasks: each loads by id, calls a service, and retries only on a transient error."""

import logging
import uuid
from typing import Any

from celery import Task, shared_task

from workflows.selectors import workflows_stuck_report
from workflows.services import webhook_delivery_attempt, webhook_dispatch_due, workflows_reconcile
from workflows.services.webhooks import webhooks_sent_here

logger = logging.getLogger(__name__)


@shared_task(bind=True, name="workflows.process_workflow", max_retries=None)
def process_workflow(self: Task, message: dict[str, str], claim: str | None = None) -> None:
    """Consume one workflow message (seed 3.3); the message carries ids only."""
    from linking.services import link_process

    # The ending's webhook is sent by this task, right after the ending commits.
    with webhooks_sent_here():
        outcome = link_process(
            workflow_id=message["workflow-id"], claim_id=uuid.UUID(claim) if claim else None
        )
    if outcome.retry_in is not None:
        # The same claim rides along, so the retry resumes this work instead of waiting out
        # the claim's lease; attempts are counted in PostgreSQL, not by Celery.
        raise self.retry(
            args=(message,), kwargs={"claim": str(outcome.claim_id)}, countdown=outcome.retry_in
        )


@shared_task(name="workflows.deliver_webhook")
def deliver_webhook(delivery_id: int) -> None:
    webhook_delivery_attempt(delivery_id=delivery_id)


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
