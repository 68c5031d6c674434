"""The life of a link after it is made: its history, and de-linking."""

import datetime as dt
import uuid
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from linking.models import LinkEvent, LinkHistory, MappingStatus, PatientMapping
from merchant.models import Customer
from workflows.services import webhook_event_create
from workflows.services.webhooks import webhook_delivery_send_later


def link_history_record(
    *, mapping: PatientMapping, event: str, actor: str, reason: str = ""
) -> LinkHistory:
    history = link_history_new(mapping=mapping, event=event, actor=actor, reason=reason)
    history.save(force_insert=True)
    return history


def link_history_new(
    *,
    mapping: PatientMapping,
    event: str,
    actor: str,
    reason: str = "",
    at: dt.datetime | None = None,
) -> LinkHistory:
    """A history line about `mapping`, not saved yet (link_record inserts it with the mapping)."""
    return LinkHistory(
        customer_id=mapping.customer_id,
        customer_patient_id=mapping.customer_patient_id,
        event=event,
        mapping=mapping,
        workflow_id=mapping.workflow_id,
        internal_patient_id=mapping.internal_patient_id,
        score=mapping.score,
        actor=actor,
        reason=reason,
        at=at or timezone.now(),
    )


class LinkNotFound(Exception):
    """This customer never linked this patient id (or it is another customer's)."""


@dataclass(frozen=True)
class Delinked:
    mapping: PatientMapping
    already: bool  # an earlier call did it: DELETE is idempotent


def link_delink(*, customer: Customer, patient_id: str, actor: str, reason: str = "") -> Delinked:
    """Set the customer patient's LINKED mapping DE-LINKED, record who and why, and send a
    `link.delinked` webhook. Calling it again answers the same without doing anything."""
    try:
        parsed = uuid.UUID(patient_id)
    except ValueError as exc:
        raise LinkNotFound() from exc
    with transaction.atomic():
        mapping = (
            PatientMapping.objects.select_for_update(of=("self",))
            .select_related("workflow", "workflow__customer")
            .filter(customer=customer, customer_patient_id=parsed, status=MappingStatus.LINKED)
            .first()
        )
        if mapping is None:
            latest = (
                PatientMapping.objects.filter(customer=customer, customer_patient_id=parsed)
                .order_by("-delinked_at")
                .first()
            )
            if latest is None:
                raise LinkNotFound()
            return Delinked(mapping=latest, already=True)
        now = timezone.now()
        mapping.status = MappingStatus.DELINKED
        mapping.delinked_at = now
        mapping.delinked_by = actor
        mapping.delinked_reason = reason
        mapping.updated_at = now
        mapping.save(
            update_fields=["status", "delinked_at", "delinked_by", "delinked_reason", "updated_at"]
        )
        link_history_record(mapping=mapping, event=LinkEvent.DELINKED, actor=actor, reason=reason)
        delivery = webhook_event_create(
            workflow=mapping.workflow,
            event_type="link.delinked",
            data={
                "workflow-id": str(mapping.workflow_id),
                "status": MappingStatus.DELINKED.value,
                "customer-patient-id": str(mapping.customer_patient_id),
                "reason": reason or None,
            },
        )
        webhook_delivery_send_later(delivery=delivery)
    return Delinked(mapping=mapping, already=False)
