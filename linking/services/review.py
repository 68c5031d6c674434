"""An operator's resolution of a workflow in REVIEW: link one candidate, or reject them all."""

import uuid

from django.db import transaction

from linking.internal_search import Candidate
from linking.models import LinkEvent, LinkHistory, SearchCandidate
from linking.services.process import link_record
from workflows.models import Status, Workflow
from workflows.services import workflow_finish, workflow_transition

# What the customer reads when an operator rejects every candidate: the operator's own note
# stays internal (timeline and link history).
REJECTED_PUBLIC_REASON = "no match (reviewed)"


class ReviewError(ValueError):
    """The review cannot be resolved this way (not in review, not a candidate, no reason)."""


def review_candidates(*, workflow: Workflow) -> list[SearchCandidate]:
    """The candidates of the workflow's latest search, best first: what the operator picks from."""
    searches = SearchCandidate.objects.filter(workflow=workflow)
    latest = searches.order_by("-attempt").values_list("attempt", flat=True).first()
    if latest is None:
        return []
    return list(searches.filter(attempt=latest).order_by("rank"))


def link_review_resolve(
    *,
    workflow_id: uuid.UUID,
    internal_patient_id: str | None,
    actor: str,
    reason: str,
) -> Workflow:
    """Link the candidate `internal_patient_id`, or with None reject them all (NO_RESULTS); the
    workflow completes and the customer's webhook is queued in the same transaction.

    Final: the workflow leaves REVIEW for COMPLETED, which neither the sweep nor a re-queue
    touches again. Raises ReviewError, or Workflow.DoesNotExist."""
    if not reason.strip():
        raise ReviewError("a reason is required")
    with transaction.atomic():
        workflow = (
            Workflow.objects.select_for_update(of=("self",))
            .select_related("customer")
            .get(id=workflow_id)
        )
        if workflow.status != Status.REVIEW:
            raise ReviewError(f"workflow {workflow_id} is {workflow.status}, not awaiting review")
        if internal_patient_id is None:
            workflow = workflow_transition(
                workflow=workflow,
                name="mark_no_results",
                actor=actor,
                reason=f"review rejected: {reason}",
                public_reason=REJECTED_PUBLIC_REASON,
            )
            LinkHistory.objects.create(
                customer_id=workflow.customer_id,
                customer_patient_id=workflow.patient_id,
                event=LinkEvent.REVIEW_REJECTED,
                workflow=workflow,
                actor=actor,
                reason=reason,
            )
        else:
            chosen = next(
                (
                    c
                    for c in review_candidates(workflow=workflow)
                    if c.internal_patient_id == internal_patient_id
                ),
                None,
            )
            if chosen is None:
                raise ReviewError(f"{internal_patient_id} is not a candidate of this review")
            workflow = link_record(
                workflow=workflow,
                candidate=Candidate(chosen.internal_patient_id, chosen.score, chosen.match_grade),
                actor=actor,
                reason=f"review: {reason}",
            )
        return workflow_finish(workflow=workflow, name="complete", actor=actor)
