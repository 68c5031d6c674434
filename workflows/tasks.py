"""Celery tasks of the consumer side. Each loads by id and calls a service."""

import logging

from celery import shared_task

logger = logging.getLogger(__name__)


@shared_task(name="workflows.process_workflow")
def process_workflow(message: dict[str, str]) -> None:
    """Consume one workflow message (seed 3.3); the message carries ids only."""
    from linking.processing import link_process

    link_process(workflow_id=message["workflow-id"])
