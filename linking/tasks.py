"""The consumer of the workflows queue, and the periodic link tasks run by beat."""

from celery import shared_task

from linking.services import (
    idempotency_purge_expired,
    link_batches_purge_expired,
    links_process,
    request_data_purge_expired,
    search_callbacks_purge,
)

# The names are the queue's contract, kept from when the consumer lived in workflows/: a message
# already queued under them must still find its task. workflows_publish sends to the first.


@shared_task(name="workflows.process_workflows")
def process_workflows(workflow_ids: list[str], **_before_the_schedule: object) -> None:
    """Consume one batch of workflows; the message carries their ids only. What cannot finish
    now is put back on the schedule in PostgreSQL (workflows/scheduler.py), never sent again
    from here. (Messages queued before the schedule may carry `claims` or `resumed`: ignored.)
    """
    links_process(workflow_ids=workflow_ids)


@shared_task(name="workflows.process_workflow")
def process_workflow(message: dict[str, str], claim: str | None = None) -> None:
    """A message of the one-workflow format that came before batches (still queued across an
    upgrade): worked as a batch of one."""
    workflow_id = message["workflow-id"]
    process_workflows(workflow_ids=[workflow_id])


@shared_task(name="linking.purge_idempotency_records")
def purge_idempotency_records() -> int:
    # Also the search callbacks' ids (the same kind of short-lived replay protection) and the
    # batch records past LINK_BATCH_RETENTION_DAYS.
    return idempotency_purge_expired() + search_callbacks_purge() + link_batches_purge_expired()


@shared_task(name="linking.purge_request_data")
def purge_request_data() -> int:
    return request_data_purge_expired()
