"""Webhook deliveries: created with the terminal state, sent after commit, retried by beat."""

import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from config import metrics
from merchant.models import Customer
from workflows.models import (
    DeliveryStatus,
    Status,
    WebhookDelivery,
    Workflow,
)
from workflows.webhook_client import WebhookSendError, webhook_post, webhook_signature_headers

logger = logging.getLogger(__name__)

# While one worker is sending, the row is not due for anyone else (a crashed sender's
# delivery becomes due again after this).
SENDING_LEASE_SECONDS = 30


def webhook_event_type(workflow: Workflow) -> str:
    outcome = "completed" if workflow.status == Status.COMPLETED else "failed"
    return f"{workflow.request_type.lower()}.{outcome}"


def webhook_payload(*, event_type: str, at: dt.datetime, data: dict[str, Any]) -> str:
    """A thin payload: ids and outcome, never demographics."""
    body = {"type": event_type, "timestamp": at.isoformat().replace("+00:00", "Z"), "data": data}
    return json.dumps(body, separators=(",", ":"))


def webhook_delivery_new(*, workflow: Workflow) -> WebhookDelivery:
    """The webhook announcing the workflow's ending, not saved yet: workflow_finish inserts it
    in the ending's own statement, tied to the ending's transition."""
    return webhook_event_new(
        workflow=workflow,
        event_type=webhook_event_type(workflow),
        data={
            "workflow-id": str(workflow.id),
            "status": workflow.status,
            "result": workflow.result,
            "customer-patient-id": str(workflow.patient_id),
            "reason": workflow.reason or None,
        },
    )


def webhook_event_create(
    *, workflow: Workflow, event_type: str, data: dict[str, Any]
) -> WebhookDelivery:
    """A webhook about `workflow` for its customer, due now (call inside the event's
    transaction): a de-link, say. Endings are announced by workflow_finish."""
    delivery = webhook_event_new(workflow=workflow, event_type=event_type, data=data)
    delivery.save(force_insert=True)
    return delivery


def webhook_event_new(
    *, workflow: Workflow, event_type: str, data: dict[str, Any]
) -> WebhookDelivery:
    """A webhook about `workflow` for its customer, due now, not saved yet."""
    now = timezone.now()
    delivery = WebhookDelivery(
        webhook_id=f"msg_{uuid.uuid4().hex}",
        workflow=workflow,
        customer_id=workflow.customer_id,
        event_type=event_type,
        url=workflow.webhook_url or workflow.customer.webhook_url,
        payload=webhook_payload(event_type=event_type, at=now, data=data),
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    if Workflow.customer.is_cached(workflow):
        # Sent right after the commit by the same task (webhooks_sent_here): no reading back.
        delivery.customer = workflow.customer
    return delivery


# Deliveries committed inside `webhooks_sent_here()`, which sends them itself.
_sent_here: ContextVar[list[WebhookDelivery] | None] = ContextVar(
    "webhooks_sent_here", default=None
)


@contextmanager
def webhooks_sent_here() -> Iterator[None]:
    """Within this block (a worker's task), the webhooks whose rows commit are sent by this very
    task when the block ends, instead of by a second Celery task: one publish and one task fewer
    per workflow (`make bench`, README "Performance"). The rows are committed and due either
    way, so if the task dies first beat's dispatch sends them. Nothing is sent if the block
    raised: beat does."""
    sent_here: list[WebhookDelivery] = []
    token = _sent_here.set(sent_here)
    try:
        yield
    finally:
        _sent_here.reset(token)
    for delivery in sent_here:
        try:
            webhook_delivery_attempt(delivery_id=delivery.id, delivery=delivery)
        except Exception as exc:
            logger.warning(
                "webhook delivery %s failed in the task (%s); beat will send it",
                delivery.id,
                type(exc).__name__,
            )


def webhook_delivery_send_later(*, delivery: WebhookDelivery) -> None:
    """Ask a worker to send it once the current transaction commits (beat is the fallback), or,
    inside `webhooks_sent_here()`, leave it to that block."""
    from workflows.tasks import deliver_webhook

    def enqueue() -> None:
        sent_here = _sent_here.get()
        if sent_here is not None:
            sent_here.append(delivery)
            return
        try:
            deliver_webhook.apply_async(args=(delivery.id,))
        except Exception as exc:
            logger.warning(
                "could not enqueue webhook %s (%s); beat will send it",
                delivery.webhook_id,
                type(exc).__name__,
            )

    transaction.on_commit(enqueue)


def webhook_customer_signature_headers(
    *, customer: Customer, webhook_id: str, body: str, at: dt.datetime
) -> dict[str, str]:
    """Standard Webhooks headers signed with the customer's secret and, during a rotation's
    overlap, also with the previous one (new first): receivers accept any one that matches."""
    headers = webhook_signature_headers(
        secret=customer.webhook_secret, webhook_id=webhook_id, body=body, at=at
    )
    until = customer.webhook_secret_previous_until
    if customer.webhook_secret_previous and until is not None and at < until:
        previous = webhook_signature_headers(
            secret=customer.webhook_secret_previous, webhook_id=webhook_id, body=body, at=at
        )
        headers["webhook-signature"] += " " + previous["webhook-signature"]
    return headers


@dataclass(frozen=True)
class AttemptOutcome:
    status: str
    status_code: int | None = None
    error: str = ""


# The conditional claim: of two workers handed the same delivery, only one sends it.
_CLAIM = """
UPDATE workflows_webhookdelivery
   SET next_attempt_at = %(lease)s, attempts = attempts + 1, updated_at = %(now)s
 WHERE id = %(id)s AND status = %(pending)s AND next_attempt_at <= %(now)s
RETURNING attempts
"""


def webhook_delivery_attempt(
    *, delivery_id: int, delivery: WebhookDelivery | None = None
) -> AttemptOutcome | None:
    """Make one attempt if the delivery is due; None when it is not (sent, or someone else's).

    `delivery`, with its customer loaded, is the row as its creator just committed it
    (webhooks_sent_here): it is claimed without being read back. A delivery's payload, URL and
    webhook-id never change, and the customer is the one read in the ending's transaction."""
    now = timezone.now()
    lease = now + dt.timedelta(seconds=settings.WEBHOOK_TIMEOUT_SECONDS + SENDING_LEASE_SECONDS)
    with connection.cursor() as cursor:
        cursor.execute(
            _CLAIM,
            {"lease": lease, "now": now, "id": delivery_id, "pending": DeliveryStatus.PENDING},
        )
        claimed = cursor.fetchone()
    if claimed is None:
        return None
    if delivery is None or not WebhookDelivery.customer.is_cached(delivery):
        delivery = WebhookDelivery.objects.select_related("customer").get(id=delivery_id)
    delivery.attempts = claimed[0]
    customer = delivery.customer
    if not customer.webhook_enabled:
        return _settle(delivery, AttemptOutcome(DeliveryStatus.DISABLED, error="endpoint disabled"))

    headers = webhook_customer_signature_headers(
        customer=customer, webhook_id=delivery.webhook_id, body=delivery.payload, at=timezone.now()
    )
    try:
        response = webhook_post(url=delivery.url, body=delivery.payload, headers=headers)
    except WebhookSendError as exc:
        outcome = (
            AttemptOutcome(DeliveryStatus.EXHAUSTED, error=str(exc))
            if exc.permanent
            else _retry_or_exhaust(delivery, error=str(exc))
        )
        return _settle(
            delivery, outcome, latency_ms=int((timezone.now() - now).total_seconds() * 1000)
        )

    code = response.status_code
    if 200 <= code < 300:
        outcome = AttemptOutcome(DeliveryStatus.DELIVERED, status_code=code)
    elif code == 410:
        outcome = AttemptOutcome(DeliveryStatus.DISABLED, status_code=code, error="410 Gone")
        Customer.objects.filter(id=customer.id).update(webhook_enabled=False)
        logger.warning("webhook endpoint of customer %s answered 410: disabled", customer.id)
    else:
        error = "redirect not followed" if 300 <= code < 400 else f"HTTP {code}"
        outcome = _retry_or_exhaust(delivery, error=error, status_code=code)
    return _settle(delivery, outcome, latency_ms=response.latency_ms)


def _retry_or_exhaust(
    delivery: WebhookDelivery, *, error: str, status_code: int | None = None
) -> AttemptOutcome:
    if delivery.attempts > len(settings.WEBHOOK_RETRY_SCHEDULE):
        return AttemptOutcome(DeliveryStatus.EXHAUSTED, status_code=status_code, error=error)
    return AttemptOutcome(DeliveryStatus.PENDING, status_code=status_code, error=error)


# The attempt's log line and the delivery's new state: one statement, so one transaction.
_SETTLE = """
WITH logged AS (
  INSERT INTO workflows_webhookattempt (delivery_id, at, status_code, latency_ms, error)
  VALUES (%(id)s, %(now)s, %(code)s, %(latency_ms)s, %(error)s)
)
UPDATE workflows_webhookdelivery
   SET status = %(status)s, next_attempt_at = %(next_attempt_at)s,
       last_status_code = %(code)s, last_error = %(error)s, updated_at = %(now)s,
       delivered_at = %(delivered_at)s
 WHERE id = %(id)s
"""


def _settle(
    delivery: WebhookDelivery, outcome: AttemptOutcome, *, latency_ms: int = 0
) -> AttemptOutcome:
    now = timezone.now()
    next_attempt_at = None
    if outcome.status == DeliveryStatus.PENDING:
        wait = settings.WEBHOOK_RETRY_SCHEDULE[delivery.attempts - 1]
        next_attempt_at = now + dt.timedelta(seconds=wait)
    with connection.cursor() as cursor:
        cursor.execute(
            _SETTLE,
            {
                "id": delivery.id,
                "now": now,
                "code": outcome.status_code,
                "latency_ms": latency_ms,
                "error": outcome.error,
                "status": outcome.status,
                "next_attempt_at": next_attempt_at,
                "delivered_at": now if outcome.status == DeliveryStatus.DELIVERED else None,
            },
        )
    metrics.webhook_attempt_settled(outcome.status)
    return outcome


def webhook_deliveries_due(*, limit: int = 500) -> list[int]:
    """Ids of deliveries whose next attempt is due, oldest first."""
    return list(
        WebhookDelivery.objects.filter(
            status=DeliveryStatus.PENDING, next_attempt_at__lte=timezone.now()
        )
        .order_by("next_attempt_at")
        .values_list("id", flat=True)[:limit]
    )


def webhook_dispatch_due(*, limit: int = 500) -> int:
    """Enqueue every due delivery (beat). Enqueuing one twice is harmless: sending claims it."""
    from workflows.tasks import deliver_webhook

    ids = webhook_deliveries_due(limit=limit)
    for delivery_id in ids:
        deliver_webhook.apply_async(args=(delivery_id,))
    return len(ids)


def webhook_redeliver(
    *, workflow_ids: list[uuid.UUID] | None = None, failed_since: dt.datetime | None = None
) -> int:
    """Send deliveries again from the start of the schedule, with the same webhook-id.

    By workflow: every delivery of those workflows. By date: deliveries that ended EXHAUSTED or
    DISABLED since then. Returns how many were re-queued.
    """
    deliveries = WebhookDelivery.objects.all()
    if workflow_ids is not None:
        deliveries = deliveries.filter(workflow_id__in=workflow_ids)
    if failed_since is not None:
        deliveries = deliveries.filter(
            Q(status=DeliveryStatus.EXHAUSTED) | Q(status=DeliveryStatus.DISABLED),
            updated_at__gte=failed_since,
        )
    if workflow_ids is None and failed_since is None:
        raise ValueError("name workflows or a date")
    now = timezone.now()
    with transaction.atomic():
        ids = list(deliveries.select_for_update().values_list("id", flat=True))
        WebhookDelivery.objects.filter(id__in=ids).update(
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            updated_at=now,
            delivered_at=None,
        )
        for delivery in WebhookDelivery.objects.filter(id__in=ids):
            webhook_delivery_send_later(delivery=delivery)
    return len(ids)
