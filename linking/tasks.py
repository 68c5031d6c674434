"""Periodic link tasks run by beat."""

from celery import shared_task

from linking.services import idempotency_purge_expired


@shared_task(name="linking.purge_idempotency_records")
def purge_idempotency_records() -> int:
    return idempotency_purge_expired()
