"""Reads of the link API."""

import uuid
from typing import Any

from django.db import connection
from rest_framework.fields import DateTimeField

from merchant.models import Customer
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
    return {
        "workflow-id": str(id_),
        "status": status,
        "result": result,
        "reason": reason if status == Status.FAILED else None,
        "created-at": _DATETIME.to_representation(created_at),
        "updated-at": _DATETIME.to_representation(updated_at),
    }
