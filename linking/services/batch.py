"""Link use cases: accepting many link requests at once (POST /link/batch)."""

import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from linking.models import LinkBatch
from linking.services.accept import (
    IdempotencyKeyReused,
    LinkAcceptance,
    LinkItem,
    LinkRefused,
    RequestInFlight,
    link_accept,
    links_accept,
    try_lock,
)
from merchant.models import Customer


@dataclass(frozen=True)
class BatchRefusal:
    """One item refused before anything was written (validation): its problem+json body."""

    problem: dict[str, Any]


def link_accept_batch(
    *,
    customer: Customer,
    idempotency_key: str,
    fingerprint: str,
    items: Sequence[LinkItem | BatchRefusal],
    refusal_problem: Callable[[LinkRefused], dict[str, Any]],
) -> LinkAcceptance:
    """Accept every valid item as POST /link would, all in one transaction (each
    item durable, all together, before the 202), or replay the batch's first answer.

    The answer is the one accepting the items one by one, in order, with link_accept would
    give: a later item sees the earlier ones (the same patient twice is link-in-progress for
    the second, the same key and body twice a replay), and a refused item never refuses the
    others. For speed the items whose key and patient are each the first of their kind go in
    one statement (links_accept): no later item can change their outcome, nor they
    an earlier one's. Every other item (and one whose expired key that statement forgot)
    then goes through link_accept, which sees them all. `refusal_problem` renders a refusal as POST
    /link answers it (the API's: the answer stored for replay is the answer given).
    """
    with transaction.atomic():
        if not try_lock(f"link-batch:{customer.id}:{idempotency_key}"):
            raise RequestInFlight()
        replay = _batch_replay(customer=customer, key=idempotency_key, fingerprint=fingerprint)
        if replay is not None:
            return replay
        answers: dict[int, dict[str, Any]] = {}
        first: list[tuple[int, LinkItem]] = []
        later: list[tuple[int, LinkItem]] = []
        keys: set[str] = set()
        patients: set[str] = set()
        for index, item in enumerate(items):
            if isinstance(item, BatchRefusal):
                answers[index] = {"index": index, "problem": item.problem}
                continue
            patient = item.request_data["patient"]["id"]
            unseen = item.idempotency_key not in keys and patient not in patients
            (first if unseen else later).append((index, item))
            keys.add(item.idempotency_key)
            patients.add(patient)
        try:
            taken = links_accept(customer=customer, items=[item for _, item in first])
        except IntegrityError:
            # A concurrent request won a unique constraint: each item goes on its own.
            taken = [None] * len(first)
        for (index, item), outcome in zip(first, taken, strict=True):
            if outcome is None:
                later.append((index, item))
            else:
                answers[index] = _item_answer(index, outcome, refusal_problem)
        for index, item in sorted(later, key=lambda pair: pair[0]):
            try:
                outcome = link_accept(
                    customer=customer,
                    idempotency_key=item.idempotency_key,
                    body=item.body,
                    request_data=item.request_data,
                )
            except LinkRefused as exc:
                outcome = exc
            answers[index] = _item_answer(index, outcome, refusal_problem)
        ordered = [answers[index] for index in range(len(items))]
        accepted_count = sum("workflow-id" in answer for answer in ordered)
        batch_id = uuid.uuid4()
        body = {
            "batch-id": str(batch_id),
            "accepted": accepted_count,
            "refused": len(ordered) - accepted_count,
            "items": ordered,
        }
        now = timezone.now()
        LinkBatch.objects.create(
            id=batch_id,
            customer=customer,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            response_body=json.dumps(body),
            created_at=now,
            expires_at=now + dt.timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS),
        )
    return LinkAcceptance(status=202, body=body, headers=_headers(batch_id))


def link_batches_purge_expired(*, now: dt.datetime | None = None) -> int:
    """Delete the batch records made more than LINK_BATCH_RETENTION_DAYS ago (their workflows
    stay); returns how many were deleted."""
    cutoff = (now or timezone.now()) - dt.timedelta(days=settings.LINK_BATCH_RETENTION_DAYS)
    deleted, _ = LinkBatch.objects.filter(created_at__lt=cutoff).delete()
    return deleted


def _item_answer(
    index: int,
    outcome: LinkAcceptance | LinkRefused,
    refusal_problem: Callable[[LinkRefused], dict[str, Any]],
) -> dict[str, Any]:
    if isinstance(outcome, LinkRefused):
        return {"index": index, "problem": refusal_problem(outcome)}
    return {"index": index, "workflow-id": outcome.body["workflow-id"]}


def _headers(batch_id: uuid.UUID) -> dict[str, str]:
    return {"Location": f"/link/batch/{batch_id}"}


def _batch_replay(*, customer: Customer, key: str, fingerprint: str) -> LinkAcceptance | None:
    batch = LinkBatch.objects.filter(customer=customer, idempotency_key=key).first()
    if batch is None:
        return None
    if batch.expires_at <= timezone.now():
        # Past the replay window: the key is free again; the batch stays readable by its id.
        LinkBatch.objects.filter(id=batch.id).update(idempotency_key=None)
        return None
    if batch.fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    return LinkAcceptance(
        status=202,
        body=json.loads(batch.response_body),
        headers={**_headers(batch.id), "Idempotent-Replayed": "true"},
        replayed=True,
    )
