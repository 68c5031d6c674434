"""Link use cases: accepting a link request (the ack path)."""

import contextlib
import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from config.sql import insert_select
from linking.models import IdempotencyRecord, LinkRequest, MappingStatus, PatientMapping
from linking.quality import demographics_quality
from merchant.models import Customer
from workflows.models import PENDING_STATES, Status, Workflow, WorkflowTransition
from workflows.services import workflow_announce, workflow_announcement, workflow_new

# What a client is told to wait before polling the status (or retrying an in-flight request).
STATUS_RETRY_AFTER_SECONDS = 5
IN_FLIGHT_RETRY_AFTER_SECONDS = 1
# Constants of the code, written into the statement (the partial unique index's own list).
_PENDING_SQL = ", ".join(f"'{state}'" for state in PENDING_STATES)


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


def request_fingerprint(body: Any) -> str:
    """SHA-256 of the canonical JSON of the body as sent (key order and spacing ignored)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def link_accept(
    *, customer: Customer, idempotency_key: str, body: Any, request_data: dict[str, Any]
) -> LinkAcceptance:
    """Accept a link request durably, or replay/refuse it (seed 3.2).

    The workflow, the request data and the idempotency record are written in one transaction
    (usually one statement: _accept_new) that also announces the workflow to the dispatcher
    (workflows/dispatcher.py), which publishes its queue message once the transaction has
    committed. Nothing here waits on the broker. `body` is the parsed body as sent
    (for the fingerprint), `request_data` its validated, canonical form (what is stored).
    """
    refusal = demographics_quality(request_data["patient"]).refusal(settings.MIN_DEMOGRAPHICS_SCORE)
    if refusal is not None:
        raise InsufficientDemographics(refusal)
    fingerprint = request_fingerprint(body)
    patient_id = uuid.UUID(request_data["patient"]["id"])
    workflow = _accept_new(
        customer=customer,
        key=idempotency_key,
        fingerprint=fingerprint,
        patient_id=patient_id,
        request_data=request_data,
    )
    if workflow is None:
        otherwise = _accept_otherwise(
            customer=customer,
            key=idempotency_key,
            fingerprint=fingerprint,
            patient_id=patient_id,
            request_data=request_data,
        )
        if isinstance(otherwise, LinkAcceptance):
            return otherwise
        workflow = otherwise
    return _accepted_response(workflow)


def _accept_otherwise(
    *,
    customer: Customer,
    key: str,
    fingerprint: str,
    patient_id: uuid.UUID,
    request_data: dict[str, Any],
) -> Workflow | LinkAcceptance:
    """Whatever the single statement did not take: a replay, a refusal, an expired key, a race
    lost to a concurrent request. One query at a time, under the key's lock, so each case can
    be told apart."""
    try:
        with transaction.atomic():
            if not _try_lock_key(customer_id=customer.id, key=key):
                raise RequestInFlight()
            replay = _replay(customer=customer, key=key, fingerprint=fingerprint)
            if replay is not None:
                return replay
            _refuse_if_linked_or_pending(customer=customer, patient_id=patient_id)
            workflow = _persist(
                customer=customer,
                key=key,
                fingerprint=fingerprint,
                patient_id=patient_id,
                request_data=request_data,
            )
            workflow_announce(workflow=workflow)
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
    return workflow


def _lock_name(*, customer_id: uuid.UUID, key: str) -> str:
    return f"idempotency:{customer_id}:{key}"


def _try_lock_key(*, customer_id: uuid.UUID, key: str) -> bool:
    """Take a transaction-scoped advisory lock on (customer, key) without waiting.

    Failing to get it means another request with the same key is being processed right now:
    the client gets 409 instead of waiting on our row locks.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))",
            [_lock_name(customer_id=customer_id, key=key)],
        )
        row = cursor.fetchone()
    return bool(row and row[0])


def _accept_new(
    *,
    customer: Customer,
    key: str,
    fingerprint: str,
    patient_id: uuid.UUID,
    request_data: dict[str, Any],
) -> Workflow | None:
    """The common case in one statement, so one round trip to PostgreSQL: a new key for a
    patient with no link and nothing pending. The request data, the workflow, its first
    timeline line and the idempotency record are inserted together (one statement is one
    transaction), under the same key lock as _accept_otherwise, or not at all; the workflow is
    announced (pg_notify, delivered at commit) only when they are. None when any
    condition fails, or a concurrent request wins a unique constraint: _accept_otherwise then
    says why, one query at a time."""
    link_request, workflow, first, record = _new_rows(
        customer=customer,
        key=key,
        fingerprint=fingerprint,
        patient_id=patient_id,
        request_data=request_data,
    )
    request_sql, params = insert_select(link_request, name="request")
    # Built from model metadata only; every value is a parameter.
    sql = (
        f"WITH request AS ({request_sql} "  # noqa: S608
        "WHERE pg_try_advisory_xact_lock(hashtextextended(%(lock)s, 0))"
        " AND NOT EXISTS (SELECT 1 FROM linking_idempotencyrecord"
        " WHERE customer_id = %(customer)s AND key = %(key)s)"
        " AND NOT EXISTS (SELECT 1 FROM linking_patientmapping"
        " WHERE customer_id = %(customer)s AND customer_patient_id = %(patient)s"
        " AND status = %(linked)s)"
        " AND NOT EXISTS (SELECT 1 FROM workflows_workflow"
        " WHERE customer_id = %(customer)s AND patient_id = %(patient)s"
        f" AND status IN ({_PENDING_SQL}))"
        " RETURNING 1)"
    )
    channel, message = workflow_announcement(workflow=workflow)
    params |= {
        "lock": _lock_name(customer_id=customer.id, key=key),
        "customer": customer.id,
        "key": key,
        "patient": patient_id,
        "linked": MappingStatus.LINKED.value,
        "channel": channel,
        "message": message,
    }
    # Each later row is inserted once per row of the one before: all of them or none.
    for name, instance, source in (
        ("workflow", workflow, "request"),
        ("timeline", first, "workflow"),
        ("record", record, "workflow"),
    ):
        insert_sql, insert_params = insert_select(instance, name=name)
        sql += f", {name} AS ({insert_sql} FROM {source} RETURNING 1)"
        params |= insert_params
    # pg_notify runs once per inserted record row, so never for a request that inserted nothing
    # (a volatile call in a subquery's output is always evaluated, never optimised away).
    sql += (
        " SELECT count(*) FROM (SELECT pg_notify(%(channel)s, %(message)s) FROM record)"
        " AS announced"
    )
    try:
        # A savepoint only inside an outer transaction (tests, callers holding one); in
        # autocommit the statement is its own transaction and needs no BEGIN/COMMIT.
        with (
            transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext(),
            connection.cursor() as cursor,
        ):
            cursor.execute(sql, params)
            row = cursor.fetchone()
    except IntegrityError:
        return None
    return workflow if row and row[0] == 1 else None


def _new_rows(
    *,
    customer: Customer,
    key: str,
    fingerprint: str,
    patient_id: uuid.UUID,
    request_data: dict[str, Any],
) -> tuple[LinkRequest, Workflow, WorkflowTransition, IdempotencyRecord]:
    """The four rows of an accepted request, not saved yet."""
    request_id = uuid.uuid4()
    link_request = LinkRequest(request_id=request_id, customer=customer, data=request_data)
    workflow, first = workflow_new(
        customer=customer,
        patient_id=patient_id,
        request_id=request_id,
        webhook_url=request_data.get("webhook", ""),
    )
    accepted = _accepted_response(workflow)
    record = IdempotencyRecord(
        customer=customer,
        key=key,
        fingerprint=fingerprint,
        workflow=workflow,
        response_status=accepted.status,
        response_body=json.dumps(accepted.body),
        response_headers=accepted.headers,
        created_at=workflow.created_at,
        expires_at=workflow.created_at + dt.timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS),
    )
    return link_request, workflow, first, record


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


def _persist(
    *,
    customer: Customer,
    key: str,
    fingerprint: str,
    patient_id: uuid.UUID,
    request_data: dict[str, Any],
) -> Workflow:
    rows = _new_rows(
        customer=customer,
        key=key,
        fingerprint=fingerprint,
        patient_id=patient_id,
        request_data=request_data,
    )
    for row in rows:
        row.save(force_insert=True)
    return rows[1]


def _accepted_response(workflow: Workflow) -> LinkAcceptance:
    return LinkAcceptance(
        status=202,
        body={"workflow-id": str(workflow.id), "status": Status.RECEIVED.value},
        headers={
            "Location": f"/link/status/{workflow.id}",
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
