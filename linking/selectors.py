"""Reads of the link API."""

import uuid

from merchant.models import Customer
from workflows.models import Workflow


def workflow_get_for_customer(*, customer: Customer, workflow_id: str) -> Workflow | None:
    """The customer's own workflow, or None: malformed, unknown and foreign ids look the same."""
    try:
        parsed = uuid.UUID(workflow_id)
    except ValueError:
        return None
    return Workflow.objects.filter(id=parsed, customer=customer).first()
