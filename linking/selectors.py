"""Reads of the link API."""

import uuid
from typing import Any

from django.db import connection
from django.utils.crypto import salted_hmac
from rest_framework.fields import DateTimeField

from linking.models import SearchCandidate
from merchant.models import Customer, ReviewBy
from workflows.models import Status, Workflow

# GET /link/status is the read customers poll. Built by hand rather than through the ORM and
# LinkStatusOutputSerializer: compiling the query, building the model and deep-copying the
# serializer's fields were ~60% of the request's own time in `make bench`'s profile. The
# serializer still describes the answer in the OpenAPI document, and a test holds the two equal.
_STATUS_SQL = (
    f"SELECT id, status, result, reason, created_at, updated_at "  # noqa: S608 - constant
    f"FROM {Workflow._meta.db_table} WHERE id = %s AND customer_id = %s"
)
_DATETIME = DateTimeField()


def link_status_for_customer(*, customer: Customer, workflow_id: str) -> dict[str, Any] | None:
    """The status document of the customer's own workflow, or None: malformed, unknown and
    foreign ids look the same."""
    try:
        parsed = uuid.UUID(workflow_id)
    except ValueError:
        return None
    with connection.cursor() as cursor:
        cursor.execute(_STATUS_SQL, [parsed, customer.pk])
        row = cursor.fetchone()
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
