"""Periodic link tasks run by beat."""

from celery import shared_task

from linking.services import (
    idempotency_purge_expired,
    link_batches_purge_expired,
    request_data_purge_expired,
    search_callbacks_purge,
)


@shared_task(name="linking.purge_idempotency_records")
def purge_idempotency_records() -> int:
    # Also the search callbacks' ids (the same kind of short-lived replay protection) and the
    # batch records past LINK_BATCH_RETENTION_DAYS.
    return idempotency_purge_expired() + search_callbacks_purge() + link_batches_purge_expired()


@shared_task(name="linking.purge_request_data")
def purge_request_data() -> int:
    return request_data_purge_expired()
