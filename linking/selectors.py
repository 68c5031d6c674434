"""Reads of the link API."""

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

from django.core import signing
from django.db.models import Q
from django.utils.crypto import salted_hmac
from rest_framework.fields import DateTimeField

from linking import statements
from linking.models import LinkBatch, PatientMapping, SearchCandidate
from merchant.models import Customer, ReviewBy
from workflows.models import Status, Workflow

# GET /link/status is the read customers poll. Built by hand rather than through the ORM and
# LinkStatusOutputSerializer: compiling the query, building the model and deep-copying the
# serializer's fields were ~60% of the request's own time in `make bench`'s profile. The
# serializer still describes the answer in the OpenAPI document, and a test holds the two equal.
# The query: linking.statements.STATUS.
_DATETIME = DateTimeField()


def link_status_for_customer(*, customer: Customer, workflow_id: str) -> dict[str, Any] | None:
    """The status document of the customer's own workflow, or None: malformed, unknown and
    foreign ids look the same."""
    try:
        parsed = uuid.UUID(workflow_id)
    except ValueError:
        return None
    row = statements.status_row(workflow_id=parsed, customer_id=customer.pk)
    if row is None:
        return None
    id_, status, result, reason, created_at, updated_at = row
    document: dict[str, Any] = {
        "workflow-id": str(id_),
        "status": status,
        "result": result,
        "reason": reason if status == Status.FAILED else None,
        "created-at": _DATETIME.to_representation(created_at),
        "updated-at": _DATETIME.to_representation(updated_at),
    }
    if status == Status.REVIEW and customer.review_by == ReviewBy.CUSTOMER:
        # The customer decides (POST /link/<workflow-id>/decision): what it may see to do so.
        document["candidates"] = review_candidates_public(workflow_id=id_)
    return document


def link_batch_status(*, customer: Customer, batch_id: str) -> dict[str, Any] | None:
    """GET /link/batch/<id>: each item as accepted, with its workflow's current status; None
    for another customer's batch, an unknown or a malformed id (the same 404). Two queries."""
    try:
        batch_uuid = uuid.UUID(batch_id)
    except ValueError:
        return None
    body = (
        LinkBatch.objects.filter(id=batch_uuid, customer=customer)
        .values_list("response_body", flat=True)
        .first()
    )
    if body is None:
        return None
    answer = json.loads(body)
    current = {
        str(workflow_id): (status, result)
        for workflow_id, status, result in Workflow.objects.filter(
            customer=customer,
            id__in=[item["workflow-id"] for item in answer["items"] if "workflow-id" in item],
        ).values_list("id", "status", "result")
    }
    by_status: dict[str, int] = {}
    items = []
    for item in answer["items"]:
        if "workflow-id" in item and item["workflow-id"] in current:
            status, result = current[item["workflow-id"]]
            by_status[status] = by_status.get(status, 0) + 1
            item = {**item, "status": status, "result": result}
        items.append(item)
    return {
        "batch-id": answer["batch-id"],
        "total": len(items),
        "by-status": by_status,
        "items": items,
    }


def review_candidates(*, workflow_id: uuid.UUID) -> list[SearchCandidate]:
    """The candidates of the workflow's latest search, best first: what a reviewer picks from."""
    searches = SearchCandidate.objects.filter(workflow_id=workflow_id)
    latest = searches.order_by("-attempt").values_list("attempt", flat=True).first()
    if latest is None:
        return []
    return list(searches.filter(attempt=latest).order_by("rank"))


def candidate_public_id(candidate: SearchCandidate) -> str:
    """The candidate's id for the customer: opaque and stable, never the internal patient id
    (an HMAC of the workflow, the search attempt, the rank and the internal id)."""
    value = (
        f"{candidate.workflow_id}:{candidate.attempt}:{candidate.rank}:"
        f"{candidate.internal_patient_id}"
    )
    return "cand_" + salted_hmac("linking.candidate-id", value).hexdigest()[:24]


def review_candidates_public(*, workflow_id: uuid.UUID) -> list[dict[str, Any]]:
    """What a customer deciding its review sees of each candidate: no internal demographics."""
    return [
        {
            "candidate-id": candidate_public_id(c),
            "score": c.score,
            "grade": c.match_grade,
            "agreement": c.agreement or {},
        }
        for c in review_candidates(workflow_id=workflow_id)
    ]


# --- GET /links ---------------------------------------------------------------------------------

LINKS_LIMIT_DEFAULT = 100
LINKS_LIMIT_MAX = 500
# Per customer: one customer's cursor is no cursor for another (and says nothing of its rows).
_LINKS_CURSOR_SALT = "linking.links-cursor:{customer}"


@dataclass(frozen=True)
class LinksFilter:
    status: str | None = None
    updated_since: dt.datetime | None = None  # inclusive; aware


@dataclass(frozen=True)
class LinksPosition:
    """The last row of a page: the next page starts strictly after it, in (updated_at, id)
    descending order."""

    updated_at: dt.datetime
    id: int


class LinksCursorInvalid(ValueError):
    """Not a cursor this customer was given, or given with other filters; the message says
    which."""


def links_cursor_make(*, customer: Customer, filters: LinksFilter, after: LinksPosition) -> str:
    """An opaque, signed (SECRET_KEY, SECRET_KEY_FALLBACKS) and URL-safe cursor: the position
    and the filters it was made with."""
    since = filters.updated_since.isoformat() if filters.updated_since else None
    payload = [after.updated_at.isoformat(), after.id, filters.status, since]
    return signing.dumps(payload, salt=_LINKS_CURSOR_SALT.format(customer=customer.pk))


def links_cursor_read(*, customer: Customer, filters: LinksFilter, cursor: str) -> LinksPosition:
    """The position a cursor names; LinksCursorInvalid for a tampered or foreign one, or one
    made with other filters (its position would mean nothing for these)."""
    try:
        updated_at, id_, status, since = signing.loads(
            cursor, salt=_LINKS_CURSOR_SALT.format(customer=customer.pk)
        )
        position = LinksPosition(updated_at=dt.datetime.fromisoformat(updated_at), id=int(id_))
        made_since = dt.datetime.fromisoformat(since) if since is not None else None
    except (signing.BadSignature, ValueError, TypeError) as exc:
        raise LinksCursorInvalid("Not a cursor of this endpoint.") from exc
    if status != filters.status or made_since != filters.updated_since:
        raise LinksCursorInvalid(
            "Made with other filters: send the status and updated-since of the request that "
            "gave it."
        )
    return position


def links_page(
    *, customer: Customer, filters: LinksFilter, limit: int, after: LinksPosition | None = None
) -> dict[str, Any]:
    """GET /links: a page of the customer's mappings, newest change first, in one query.

    Keyset pagination on (updated_at, id) (index mapping_listing): a row written after
    the first page sorts before the cursor, so later pages neither repeat nor skip a row that
    was already there. Nothing of the internal patient is read."""
    rows = PatientMapping.objects.filter(customer=customer)
    if filters.status is not None:
        rows = rows.filter(status=filters.status)
    if filters.updated_since is not None:
        rows = rows.filter(updated_at__gte=filters.updated_since)
    if after is not None:
        # (updated_at, id) < (t, i), spelled so that `updated_at <= t` bounds the index scan.
        rows = rows.filter(
            Q(updated_at__lt=after.updated_at) | Q(id__lt=after.id),
            updated_at__lte=after.updated_at,
        )
    found = list(
        rows.order_by("-updated_at", "-id").values_list(
            "id", "customer_patient_id", "status", "workflow_id", "created_at", "updated_at"
        )[: limit + 1]
    )
    page, more = found[:limit], len(found) > limit
    next_cursor = None
    if more:
        last_id, *_, last_updated_at = page[-1]
        position = LinksPosition(updated_at=last_updated_at, id=last_id)
        next_cursor = links_cursor_make(customer=customer, filters=filters, after=position)
    return {
        "data": [
            {
                "customer-patient-id": str(patient_id),
                "status": status,
                "workflow-id": str(workflow_id),
                "linked-at": _DATETIME.to_representation(created_at),
                "updated-at": _DATETIME.to_representation(updated_at),
            }
            for _id, patient_id, status, workflow_id, created_at, updated_at in page
        ],
        "has-more": more,
        "next-cursor": next_cursor,
    }
