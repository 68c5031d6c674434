"""Webhook deliveries: created with the terminal state, sent after commit, retried by beat."""

import datetime as dt
import functools
import json
import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from merchant.models import Customer
from workflows import concurrent, metrics, statements
from workflows.models import (
    DeliveryStatus,
    Status,
    WebhookDelivery,
    Workflow,
)
from workflows.webhook_client import WebhookSendError, webhook_post, webhook_signature_headers

# workflows.tasks.deliver_webhooks, sent by name: the tasks module imports these services.
DELIVER_WEBHOOKS_TASK = "workflows.deliver_webhooks"

logger = logging.getLogger(__name__)


def sending_lease_seconds() -> float:
    """While one worker is sending, the row is not due for anyone else (a crashed sender's
    delivery becomes due again after this): an attempt's connect and read timeouts, and 30 s."""
    return 2 * settings.WEBHOOK_TIMEOUT_SECONDS + 30


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
        # Sent right after the commit by the consumer that ended it: no reading back.
        delivery.customer = workflow.customer
    return delivery


def webhook_delivery_send_later(*, delivery: WebhookDelivery) -> None:
    """Ask a worker to send it once the current transaction commits (beat is the fallback)."""

    def enqueue() -> None:
        try:
            current_app.send_task(DELIVER_WEBHOOKS_TASK, args=([delivery.id],))
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


@dataclass
class Sending:
    """Attempts under way: each claimed delivery with its HTTP call running (or already
    decided without one), until webhook_deliveries_settle records them."""

    attempts: list[tuple[WebhookDelivery, "Future[AttemptOutcome] | AttemptOutcome", float]]


def webhook_deliveries_start(
    *, delivery_ids: Sequence[int], known: Sequence[WebhookDelivery] = ()
) -> Sending:
    """Claim the due deliveries among these (one statement) and start their HTTP calls
    together on the batch pool; those not due (sent, or someone else's) are left out.

    `known` are rows as their creator just committed them, with their customer loaded (a
    consumer's batch): they are claimed without being read back. A delivery's payload, URL and
    webhook-id never change, and the customer is the one read in the ending's transaction."""
    if not delivery_ids:
        return Sending([])
    now = timezone.now()
    lease = now + dt.timedelta(seconds=sending_lease_seconds())
    claimed = dict(
        statements.execute(
            statements.DELIVERIES_CLAIM, {"ids": list(delivery_ids), "lease": lease, "now": now}
        )
    )
    by_id = {d.id: d for d in known if WebhookDelivery.customer.is_cached(d)}
    missing = [i for i in claimed if i not in by_id]
    if missing:
        by_id |= WebhookDelivery.objects.select_related("customer").in_bulk(missing)
    sending = Sending([])
    for delivery_id, attempts in claimed.items():
        delivery = by_id[delivery_id]
        delivery.attempts = attempts
        started = time.monotonic()
        if not delivery.customer.webhook_enabled:
            outcome = AttemptOutcome(DeliveryStatus.DISABLED, error="endpoint disabled")
            sending.attempts.append((delivery, outcome, started))
        else:
            call = concurrent.submit(functools.partial(_attempt, delivery))
            sending.attempts.append((delivery, call, started))
    return sending


def _attempt(delivery: WebhookDelivery) -> AttemptOutcome:
    """One HTTP attempt and what it means for the delivery (runs on the batch pool)."""
    customer = delivery.customer
    headers = webhook_customer_signature_headers(
        customer=customer, webhook_id=delivery.webhook_id, body=delivery.payload, at=timezone.now()
    )
    try:
        response = webhook_post(url=delivery.url, body=delivery.payload, headers=headers)
    except WebhookSendError as exc:
        if exc.permanent:
            return AttemptOutcome(DeliveryStatus.EXHAUSTED, error=str(exc))
        return _retry_or_exhaust(delivery, error=str(exc))
    code = response.status_code
    if 200 <= code < 300:
        return AttemptOutcome(DeliveryStatus.DELIVERED, status_code=code)
    if code == 410:
        return AttemptOutcome(DeliveryStatus.DISABLED, status_code=code, error="410 Gone")
    error = "redirect not followed" if 300 <= code < 400 else f"HTTP {code}"
    return _retry_or_exhaust(delivery, error=error, status_code=code)


def webhook_deliveries_settle(sending: Sending) -> dict[int, AttemptOutcome]:
    """Wait for the attempts and record them all in one statement (log lines and new states);
    an endpoint that answered 410 is disabled. Each delivery's outcome, by id."""
    outcomes: dict[int, AttemptOutcome] = {}
    params: dict[str, list[Any]] = {
        name: []
        for name in (
            "id",
            "at",
            "code",
            "latency_ms",
            "error",
            "status",
            "next_attempt_at",
            "delivered_at",
        )
    }
    gone: set[uuid.UUID] = set()
    for delivery, call, started in sending.attempts:
        try:
            outcome = call.result() if isinstance(call, Future) else call
        except Exception as exc:  # a bug in the attempt: count it, retry on the schedule
            outcome = _retry_or_exhaust(delivery, error=f"attempt failed ({type(exc).__name__})")
        latency_ms = int((time.monotonic() - started) * 1000) if isinstance(call, Future) else 0
        now = timezone.now()
        next_attempt_at = None
        if outcome.status == DeliveryStatus.PENDING:
            wait = settings.WEBHOOK_RETRY_SCHEDULE[delivery.attempts - 1]
            next_attempt_at = now + dt.timedelta(seconds=wait)
        if outcome.status_code == 410:
            gone.add(delivery.customer_id)
        for name, value in (
            ("id", delivery.id),
            ("at", now),
            ("code", outcome.status_code),
            ("latency_ms", latency_ms),
            ("error", outcome.error),
            ("status", outcome.status),
            ("next_attempt_at", next_attempt_at),
            ("delivered_at", now if outcome.status == DeliveryStatus.DELIVERED else None),
        ):
            params[name].append(value)
        outcomes[delivery.id] = outcome
    if outcomes:
        statements.execute(statements.DELIVERIES_SETTLE, params)
    for customer_id in gone:
        Customer.objects.filter(id=customer_id).update(webhook_enabled=False)
        logger.warning("webhook endpoint of customer %s answered 410: disabled", customer_id)
    for outcome in outcomes.values():
        metrics.webhook_attempt_settled(outcome.status)
    return outcomes


def webhook_deliveries_attempt(*, delivery_ids: Sequence[int]) -> dict[int, AttemptOutcome]:
    """One attempt at each due delivery among these, sent together; each one's outcome."""
    return webhook_deliveries_settle(webhook_deliveries_start(delivery_ids=delivery_ids))


def webhook_delivery_attempt(*, delivery_id: int) -> AttemptOutcome | None:
    """Make one attempt if the delivery is due; None when it is not (sent, or someone else's)."""
    return webhook_deliveries_attempt(delivery_ids=[delivery_id]).get(delivery_id)


def _retry_or_exhaust(
    delivery: WebhookDelivery, *, error: str, status_code: int | None = None
) -> AttemptOutcome:
    if delivery.attempts > len(settings.WEBHOOK_RETRY_SCHEDULE):
        return AttemptOutcome(DeliveryStatus.EXHAUSTED, status_code=status_code, error=error)
    return AttemptOutcome(DeliveryStatus.PENDING, status_code=status_code, error=error)


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
    """Enqueue every due delivery (beat), WORKER_BATCH_SIZE per message. Enqueuing one twice
    is harmless: sending claims it."""
    ids = webhook_deliveries_due(limit=limit)
    size = settings.WORKER_BATCH_SIZE
    for start in range(0, len(ids), size):
        current_app.send_task(DELIVER_WEBHOOKS_TASK, args=(ids[start : start + size],))
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
