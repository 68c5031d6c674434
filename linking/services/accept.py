"""Link use cases: accepting a link request (the ack path)."""

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
from linking.models import IdempotencyRecord, LinkRequest, MappingStatus, PatientMapping
from linking.quality import demographics_quality
from merchant.models import Customer
from workflows.models import PENDING_STATES, RequestType, Status, Workflow
from workflows.services import workflow_announcement
from workflows.statements import execute

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
    refusal = demographics_quality(request_data["patient"]).refusal(settings.MIN_DEMOGRAPHICS_SCORE)
    if refusal is not None:
        raise InsufficientDemographics(refusal)
    fingerprint = request_fingerprint(body)
    patient_id = uuid.UUID(request_data["patient"]["id"])
    new: dict[str, Any] = {
        "customer": customer,
        "key": idempotency_key,
        "fingerprint": fingerprint,
        "patient_id": patient_id,
        "request_data": request_data,
    }
    try:
        workflow_id = _accept_in_one_statement(**new)
    except IntegrityError:
        workflow_id = None  # a concurrent request won a unique constraint: _accept_otherwise
    if workflow_id is None:
        otherwise = _accept_otherwise(**new)
        if isinstance(otherwise, LinkAcceptance):
            return otherwise
        workflow_id = otherwise
    return _accepted_response(workflow_id)


def link_accept_distinct(
    *, customer: Customer, items: Sequence[LinkItem]
) -> list[uuid.UUID | None]:
    """Accept many requests in one statement (statements.ACCEPT_MANY), in the caller's
    transaction: each item's new workflow id, or None for an item it did not take (its key
    known or in flight, its patient linked or pending, its demographics too thin, or all of
    them when a concurrent request won a unique constraint meanwhile). The caller sends those
    through link_accept, which takes or refuses them one by one and says why. No two items may
    share a key or a patient (the statement would not see one from the other)."""
    taken = [
        demographics_quality(item.request_data["patient"]).refusal(settings.MIN_DEMOGRAPHICS_SCORE)
        is None
        for item in items
    ]
    rows = [item for item, ok in zip(items, taken, strict=True) if ok]
    if not rows:
        return [None] * len(items)
    now = timezone.now()
    workflows = [uuid.uuid4() for _ in rows]
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
        "fingerprint": [request_fingerprint(item.body) for item in rows],
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
        "channel": channel,
    }
    try:
        with transaction.atomic():
            inserted = {row[0] for row in execute(statements.ACCEPT_MANY, params)}
    except IntegrityError:
        inserted = set()
    new = iter(workflows)
    outcome: list[uuid.UUID | None] = []
    for ok in taken:
        workflow_id = next(new) if ok else None
        outcome.append(workflow_id if workflow_id in inserted else None)
    return outcome


def _accept_otherwise(
    *,
    customer: Customer,
    key: str,
    fingerprint: str,
    patient_id: uuid.UUID,
    request_data: dict[str, Any],
) -> uuid.UUID | LinkAcceptance:
    """Whatever the single statement did not take: a replay, a refusal, an expired key, a race
    lost to a concurrent request. One query at a time, under the key's lock, so each case can
    be told apart."""
    try:
        with transaction.atomic():
            if not try_lock(_lock_name(customer_id=customer.id, key=key)):
                raise RequestInFlight()
            replay = _replay(customer=customer, key=key, fingerprint=fingerprint)
            if replay is not None:
                return replay
            _refuse_if_linked_or_pending(customer=customer, patient_id=patient_id)
            workflow_id = _accept_in_one_statement(
                customer=customer,
                key=key,
                fingerprint=fingerprint,
                patient_id=patient_id,
                request_data=request_data,
            )
            if workflow_id is None:
                # A concurrent request committed its link or workflow since the check.
                _refuse_if_linked_or_pending(customer=customer, patient_id=patient_id)
                raise RequestInFlight()
    except IntegrityError as exc:
        # Lost a race that the checks above could not see: the constraint decides.
        constraint = getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None)
        if constraint == "workflow_one_pending_per_patient":
            pending = _pending_workflow_id(customer=customer, patient_id=patient_id)
            if pending is not None:
                raise LinkInProgress(pending) from exc
        if constraint == "idempotency_customer_key":
            raise RequestInFlight() from exc
        raise
    return workflow_id


def _lock_name(*, customer_id: uuid.UUID, key: str) -> str:
    return f"idempotency:{customer_id}:{key}"


def try_lock(name: str) -> bool:
    """Take a transaction-scoped advisory lock on a (customer, key) name without waiting.

    Failing to get it means another request with the same key is being processed right now:
    the client gets 409 instead of waiting on our row locks.
    """
    with connection.cursor() as cursor:
        cursor.execute(statements.TRY_XACT_LOCK, [name])
        row = cursor.fetchone()
    return bool(row and row[0])


def _accept_in_one_statement(
    *,
    customer: Customer,
    key: str,
    fingerprint: str,
    patient_id: uuid.UUID,
    request_data: dict[str, Any],
) -> uuid.UUID | None:
    """Write the accepted request's rows in one statement (statements.ACCEPT), so one round
    trip: the new workflow's id, or None when the key is known, the patient linked or already
    pending. A unique constraint a concurrent request won raises IntegrityError."""
    workflow_id = uuid.uuid4()
    now = timezone.now()
    channel, message = workflow_announcement(workflow_id=workflow_id)
    accepted = _accepted_response(workflow_id)
    params = {
        "request": uuid.uuid4(),
        "workflow": workflow_id,
        "customer": customer.id,
        "patient": patient_id,
        "key": key,
        "lock": _lock_name(customer_id=customer.id, key=key),
        "data": _REQUEST_DATA.get_db_prep_save(request_data, connection),
        "webhook_url": request_data.get("webhook", ""),
        "request_type": RequestType.LINK.value,
        "received": Status.RECEIVED.value,
        "linked": MappingStatus.LINKED.value,
        "pending": _PENDING,
        "fingerprint": fingerprint,
        "status": accepted.status,
        "body": json.dumps(accepted.body),
        "headers": json.dumps(accepted.headers),
        "now": now,
        "expires": now + dt.timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS),
        "channel": channel,
        "message": message,
    }
    # A savepoint only inside an outer transaction (tests, _accept_otherwise); in autocommit
    # the statement is its own transaction and needs no BEGIN/COMMIT.
    with (
        transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext(),
        connection.cursor() as cursor,
    ):
        cursor.execute(statements.ACCEPT, params)
        row = cursor.fetchone()
    return workflow_id if row and row[0] == 1 else None


def _replay(*, customer: Customer, key: str, fingerprint: str) -> LinkAcceptance | None:
    record = IdempotencyRecord.objects.filter(customer=customer, key=key).first()
    if record is None:
        return None
    if record.expires_at <= timezone.now():
        # Past retention but not purged yet: the key is free again.
        record.delete()
        return None
    if record.fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    headers = dict(record.response_headers)
    headers["Idempotent-Replayed"] = "true"
    return LinkAcceptance(
        status=record.response_status,
        body=json.loads(record.response_body),
        headers=headers,
        replayed=True,
    )


def _refuse_if_linked_or_pending(*, customer: Customer, patient_id: uuid.UUID) -> None:
    linked_by = (
        PatientMapping.objects.filter(
            customer=customer, customer_patient_id=patient_id, status=MappingStatus.LINKED
        )
        .values_list("workflow_id", flat=True)
        .first()
    )
    if linked_by is not None:
        raise PatientAlreadyLinked(linked_by)
    pending = _pending_workflow_id(customer=customer, patient_id=patient_id)
    if pending is not None:
        raise LinkInProgress(pending)


def _pending_workflow_id(*, customer: Customer, patient_id: uuid.UUID) -> uuid.UUID | None:
    return (
        Workflow.objects.filter(customer=customer, patient_id=patient_id, status__in=PENDING_STATES)
        .values_list("id", flat=True)
        .first()
    )


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
