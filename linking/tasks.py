"""The consumer of the workflows queue, and the periodic link tasks run by beat."""

import datetime as dt
import uuid

from celery import Task, shared_task

from linking.services import (
    idempotency_purge_expired,
    link_batches_purge_expired,
    links_process,
    request_data_purge_expired,
    search_callbacks_purge,
)
from workflows.services import workflows_publish

# A resumed message runs this long after the dead claim's lease ends, so that it finds it ended.
RESUME_MARGIN = dt.timedelta(seconds=0.5)

# The names are the queue's contract, kept from when the consumer lived in workflows/: a message
# already queued under them must still find its task. workflows_publish sends to the first.


@shared_task(bind=True, name="workflows.process_workflows")
def process_workflows(
    self: Task,
    workflow_ids: list[str],
    claims: dict[str, str] | None = None,
    resumed: bool = False,
) -> None:
    """Consume one batch of workflows; the message carries their ids only.

    `claims` are our own claims on some of them, riding along a retry so that it resumes that
    work instead of waiting out the claim's lease. Each workflow that must be retried is sent
    again on its own, after its own backoff: attempts are counted in PostgreSQL, not by Celery.
    What a worker shutting down handed back is sent again at once; what a redelivered message
    found still claimed (its consumer died) is sent again for when that lease ends, once.
    """
    renew = {uuid.UUID(k): uuid.UUID(v) for k, v in (claims or {}).items()}
    redelivered = bool((self.request.delivery_info or {}).get("redelivered")) and not resumed
    done = links_process(workflow_ids=workflow_ids, claims=renew, redelivered=redelivered)
    for retry in done.retries:
        process_workflows.apply_async(
            args=([str(retry.workflow_id)],),
            kwargs={"claims": {str(retry.workflow_id): str(retry.claim_id)}},
            countdown=retry.retry_in,
        )
    if done.again:
        workflows_publish(workflow_ids=done.again)
    if done.held and done.held_until is not None:
        process_workflows.apply_async(
            args=([str(workflow_id) for workflow_id in done.held],),
            kwargs={"resumed": True},
            eta=done.held_until + RESUME_MARGIN,
        )


@shared_task(name="workflows.process_workflow")
def process_workflow(message: dict[str, str], claim: str | None = None) -> None:
    """A message of the one-workflow format that came before batches (still queued across an
    upgrade): worked as a batch of one."""
    workflow_id = message["workflow-id"]
    process_workflows(workflow_ids=[workflow_id], claims={workflow_id: claim} if claim else None)


@shared_task(name="linking.purge_idempotency_records")
def purge_idempotency_records() -> int:
    # Also the search callbacks' ids (the same kind of short-lived replay protection) and the
    # batch records past LINK_BATCH_RETENTION_DAYS.
    return idempotency_purge_expired() + search_callbacks_purge() + link_batches_purge_expired()


@shared_task(name="linking.purge_request_data")
def purge_request_data() -> int:
    return request_data_purge_expired()
