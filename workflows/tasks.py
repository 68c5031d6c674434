"""Celery tasks: each loads by id, calls a service, and retries only on a transient error.

The consumer of the workflows queue (`workflows.process_workflows`) is not here: it is the
request type's (linking/tasks.py), and this app publishes to it by name
(workflows.services.workflows.workflows_publish), so that it never imports the app above it."""

import logging
from typing import Any

from celery import shared_task

from workflows.selectors import workflows_stuck_report
from workflows.services import (
    webhook_deliveries_attempt,
    webhook_dispatch_due,
    workflows_reconcile,
)
from workflows.services.webhooks import DELIVER_WEBHOOKS_TASK

logger = logging.getLogger(__name__)


@shared_task(name=DELIVER_WEBHOOKS_TASK)
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
