"""Link use cases: accepting link requests, one or many (the ack path)."""

import contextlib
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from linking import statements
from linking.models import IdempotencyRecord, LinkRequest, MappingStatus
from linking.quality import demographics_quality
from merchant.models import Customer
from workflows.models import PENDING_STATES, RequestType, Status
from workflows.services import workflow_announcement

# What a client is told to wait before polling the status (or retrying an in-flight request).
STATUS_RETRY_AFTER_SECONDS = 5
IN_FLIGHT_RETRY_AFTER_SECONDS = 1
# The request data as LinkRequest.data stores it (encrypted).
_REQUEST_DATA = LinkRequest._meta.get_field("data")
_PENDING = [state.value for state in PENDING_STATES]


class LinkRefused(Exception):
    """A link request refused before anything was written."""


class InsufficientDemographics(LinkRefused):
    """Too thin, or a placeholder name: matching it could link the wrong patient."""


class IdempotencyKeyReused(LinkRefused):
    pass


class RequestInFlight(LinkRefused):
    pass


class PatientAlreadyLinked(LinkRefused):
    def __init__(self, workflow_id: uuid.UUID) -> None:
        super().__init__(str(workflow_id))
        self.workflow_id = workflow_id


class LinkInProgress(LinkRefused):
    def __init__(self, workflow_id: uuid.UUID) -> None:
        super().__init__(str(workflow_id))
        self.workflow_id = workflow_id


@dataclass(frozen=True)
class LinkAcceptance:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    replayed: bool = False


@dataclass(frozen=True)
class LinkItem:
    """One link request as validated: its key, its body as sent (the fingerprint's input),
    and its validated, canonical form (what is stored)."""

    idempotency_key: str
    body: Any
    request_data: dict[str, Any]


def request_fingerprint(body: Any) -> str:
    """SHA-256 of the canonical JSON of the body as sent (key order and spacing ignored)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def link_accept(
    *, customer: Customer, idempotency_key: str, body: Any, request_data: dict[str, Any]
) -> LinkAcceptance:
    """Accept a link request durably, or replay/refuse it.

    The workflow, the request data and the idempotency record are written in one transaction
    (one statement: statements.ACCEPT) that also announces the workflow to the dispatcher
    (workflows/dispatcher.py), which publishes its queue message once the transaction has
    committed. Nothing here waits on the broker. `body` is the parsed body as sent
    (for the fingerprint), `request_data` its validated, canonical form (what is stored).
    """
    item = LinkItem(idempotency_key=idempotency_key, body=body, request_data=request_data)
    # Run again after forgetting an expired key, or after losing a unique constraint to a
    # concurrent request whose rows committed after the statement's snapshot (the next run
    # sees them and says why); a third loss is a request still in flight.
    for _ in range(3):
        try:
            (outcome,) = links_accept(customer=customer, items=[item])
        except IntegrityError:
            continue
        if isinstance(outcome, LinkRefused):
            raise outcome
        if outcome is not None:
            return outcome
    raise RequestInFlight()


def links_accept(
    *, customer: Customer, items: Sequence[LinkItem]
) -> list[LinkAcceptance | LinkRefused | None]:
    """Accept many requests in one statement (statements.ACCEPT), in the caller's transaction:
    each item's answer (accepted, or a replay of its key's first answer), or its refusal, or
    None when its key was known but has expired: forgotten now, the item can be sent again.
    No two items may share a key or a patient (the statement would not see one from the
    other). A unique constraint lost to a concurrent request raises IntegrityError, and
    nothing is written."""
    outcomes: list[LinkAcceptance | LinkRefused | None] = [None] * len(items)
    taken: list[int] = []
    for index, item in enumerate(items):
        quality = demographics_quality(item.request_data["patient"])
        refusal = quality.refusal(settings.MIN_DEMOGRAPHICS_SCORE)
        if refusal is None:
            taken.append(index)
        else:
            outcomes[index] = InsufficientDemographics(refusal)
    if not taken:
        return outcomes
    rows = [items[index] for index in taken]
    now = timezone.now()
    workflows = [uuid.uuid4() for _ in rows]
    fingerprints = [request_fingerprint(item.body) for item in rows]
    channel, _ = workflow_announcement(workflow_id=workflows[0])
    accepted = [_accepted_response(workflow_id) for workflow_id in workflows]
    params = {
        "request": [uuid.uuid4() for _ in rows],
        "workflow": workflows,
        "patient": [uuid.UUID(item.request_data["patient"]["id"]) for item in rows],
        "key": [item.idempotency_key for item in rows],
        "lock": [_lock_name(customer_id=customer.id, key=item.idempotency_key) for item in rows],
        "data": [_REQUEST_DATA.get_db_prep_save(item.request_data, connection) for item in rows],
        "webhook_url": [item.request_data.get("webhook", "") for item in rows],
        "fingerprint": fingerprints,
        "body": [json.dumps(answer.body) for answer in accepted],
        "headers": [json.dumps(answer.headers) for answer in accepted],
        "customer": customer.id,
        "request_type": RequestType.LINK.value,
        "received": Status.RECEIVED.value,
        "linked": MappingStatus.LINKED.value,
        "pending": _PENDING,
        "status": 202,
        "now": now,
        "expires": now + dt.timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS),
        "deadline": now + dt.timedelta(seconds=settings.WORKFLOW_DEADLINE_SECONDS),
        "channel": channel,
    }
    # A savepoint only inside an outer transaction (POST /link/batch's, tests'); in autocommit
    # the statement is its own transaction and needs no BEGIN/COMMIT.
    with transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext():
        answers = statements.accept(params)
    expired = []
    for index, answer, fingerprint, response in zip(
        taken, answers, fingerprints, accepted, strict=True
    ):
        outcome = _outcome(answer, fingerprint=fingerprint, accepted=response, now=now)
        outcomes[index] = outcome
        if outcome is None:
            expired.append(items[index].idempotency_key)
    if expired:
        # Past retention but not purged yet: the key is free again.
        IdempotencyRecord.objects.filter(
            customer=customer, key__in=expired, expires_at__lte=now
        ).delete()
    return outcomes


def _outcome(
    row: statements.Acceptance, *, fingerprint: str, accepted: LinkAcceptance, now: dt.datetime
) -> LinkAcceptance | LinkRefused | None:
    """What ACCEPT's row for an item says: its answer, its refusal, or None (key expired)."""
    if row.accepted:
        return accepted
    if not row.locked:
        return RequestInFlight()
    if row.known_fingerprint is not None:
        assert row.known_expires_at is not None and row.known_body is not None
        if row.known_expires_at <= now:
            return None
        if row.known_fingerprint != fingerprint:
            return IdempotencyKeyReused()
        headers = json.loads(row.known_headers or "{}")
        headers["Idempotent-Replayed"] = "true"
        return LinkAcceptance(
            status=row.known_status or 202,
            body=json.loads(row.known_body),
            headers=headers,
            replayed=True,
        )
    if row.linked_by is not None:
        return PatientAlreadyLinked(row.linked_by)
    if row.pending_id is not None:
        return LinkInProgress(row.pending_id)
    raise AssertionError("ACCEPT took no row and named no reason")


def _lock_name(*, customer_id: uuid.UUID, key: str) -> str:
    return f"idempotency:{customer_id}:{key}"


def try_lock(name: str) -> bool:
    """Take a transaction-scoped advisory lock on a name without waiting.

    Failing to get it means another request with the same key is being processed right now:
    the client gets 409 instead of waiting on our row locks.
    """
    return statements.try_xact_lock(name)


def _accepted_response(workflow_id: uuid.UUID) -> LinkAcceptance:
    return LinkAcceptance(
        status=202,
        body={"workflow-id": str(workflow_id), "status": Status.RECEIVED.value},
        headers={
            "Location": f"/link/status/{workflow_id}",
            "Retry-After": str(STATUS_RETRY_AFTER_SECONDS),
        },
    )


def idempotency_purge_expired(*, now: dt.datetime | None = None, batch_size: int = 5000) -> int:
    """Delete idempotency records past their retention; returns how many were deleted."""
    cutoff = now or timezone.now()
    deleted_total = 0
    while True:
        ids = list(
            IdempotencyRecord.objects.filter(expires_at__lte=cutoff).values_list("id", flat=True)[
                :batch_size
            ]
        )
        if not ids:
            return deleted_total
        deleted, _ = IdempotencyRecord.objects.filter(id__in=ids).delete()
        deleted_total += deleted
