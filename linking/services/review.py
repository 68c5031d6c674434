"""An operator's resolution of a workflow in REVIEW: link one candidate, or reject them all."""

import uuid
from dataclasses import dataclass
from typing import Any

from django.db import transaction

from linking.internal_search import Candidate, InternalSearchError, internal_patient_read
from linking.models import (
    AuditEvent,
    LinkEvent,
    LinkHistory,
    LinkRequest,
    ReviewDecision,
    SearchCandidate,
)
from linking.selectors import candidate_public_id, review_candidates
from linking.services.answers import link_record
from linking.services.patients import patient_details
from merchant.models import Customer, ReviewBy
from workflows.models import Status, Workflow
from workflows.services import Step, workflow_finish

# What the customer reads when an operator rejects every candidate: the operator's own note
# stays internal (timeline and link history).
REJECTED_PUBLIC_REASON = "no match (reviewed)"


class ReviewError(ValueError):
    """The review cannot be resolved this way (not in review, not a candidate, no reason)."""


class ReviewNotFound(ReviewError):
    """No such workflow of this customer."""


class ReviewByOperator(ReviewError):
    """This customer's reviews are decided by our operators."""


class NotInReview(ReviewError):
    """The workflow is not waiting for a decision (and this customer took none)."""


class DecisionConflict(ReviewError):
    """Another decision already ended this review."""


class UnknownCandidate(ReviewError):
    """No candidate of this review has that candidate-id."""


@dataclass(frozen=True)
class ReviewCandidate:
    candidate: SearchCandidate
    # The internal record, summed up for a person to compare; None if it could not be read.
    details: dict[str, Any] | None


@dataclass(frozen=True)
class ReviewCase:
    workflow: Workflow
    request: dict[str, Any] | None  # the demographics the customer sent
    candidates: list[ReviewCandidate]


def review_case_read(*, workflow: Workflow, actor: str) -> ReviewCase:
    """What an operator compares to decide: the customer's demographics and each candidate's
    internal record. Patient data on screen, so the read is audited like GET /patient."""
    request = LinkRequest.objects.filter(request_id=workflow.request_id).first()
    candidates = []
    outcome = "ok"
    for candidate in review_candidates(workflow_id=workflow.id):
        try:
            resource = internal_patient_read(candidate.internal_patient_id)
        except InternalSearchError:
            resource, outcome = None, "unavailable"
        candidates.append(ReviewCandidate(candidate, _summary(candidate, resource)))
    AuditEvent.objects.create(
        actor=actor,
        action="review.read",
        customer_id=workflow.customer_id,
        subject=str(workflow.patient_id),
        outcome=outcome,
    )
    return ReviewCase(
        workflow=workflow,
        request=None if request is None else request.data.get("patient"),
        candidates=candidates,
    )


def _summary(candidate: SearchCandidate, resource: dict[str, Any] | None) -> dict[str, Any] | None:
    if resource is None:
        return None
    shaped = patient_details(patient_id=candidate.internal_patient_id, resource=resource)
    return {
        "name": shaped["name"]["text"]
        or " ".join([*shaped["name"]["given"], shaped["name"]["family"] or ""]),
        "birth_date": shaped["birth-date"],
        "gender": shaped["gender"],
        "telecom": [t["value"] for t in shaped["telecom"] if t["value"]],
        "address": [
            a["text"] or ", ".join([*a["line"], a["city"] or ""]) for a in shaped["address"]
        ],
    }


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
        chosen: SearchCandidate | None = None
        if internal_patient_id is None:
            outcome = Step(
                "mark_no_results",
                f"review rejected: {reason}",
                {"public_reason": REJECTED_PUBLIC_REASON},
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
                    for c in review_candidates(workflow_id=workflow.id)
                    if c.internal_patient_id == internal_patient_id
                ),
                None,
            )
            if chosen is None:
                raise ReviewError(f"{internal_patient_id} is not a candidate of this review")
            assert chosen is not None
            outcome = link_record(
                workflow=workflow,
                candidate=Candidate(chosen.internal_patient_id, chosen.score, chosen.match_grade),
                actor=actor,
                reason=f"review: {reason}",
            )
        ReviewDecision.objects.create(
            workflow=workflow,
            candidate_id="" if chosen is None else candidate_public_id(chosen),
            actor=actor,
        )
        return workflow_finish(workflow=workflow, name="complete", actor=actor, first=[outcome])


def link_review_decide(
    *, customer: Customer, workflow_id: str, candidate_id: str | None, reason: str = ""
) -> Workflow:
    """A customer's decision on its own review (review_by=customer): link the candidate
    `candidate_id`, or with None reject them all. The same decision again changes nothing and
    returns the workflow; a different one after a decision raises DecisionConflict."""
    try:
        parsed = uuid.UUID(workflow_id)
    except ValueError as exc:
        raise ReviewNotFound(workflow_id) from exc
    actor = f"customer:{customer.id}"
    with transaction.atomic():
        workflow = (
            Workflow.objects.select_for_update(of=("self",))
            .filter(id=parsed, customer_id=customer.id)
            .first()
        )
        if workflow is None:
            raise ReviewNotFound(workflow_id)
        taken = ReviewDecision.objects.filter(workflow=workflow).first()
        if taken is not None:
            if taken.actor == actor and taken.candidate_id == (candidate_id or ""):
                return workflow
            raise DecisionConflict(workflow_id)
        if customer.review_by != ReviewBy.CUSTOMER:
            raise ReviewByOperator(workflow_id)
        if workflow.status != Status.REVIEW:
            raise NotInReview(workflow_id)
        internal_patient_id = None
        if candidate_id is not None:
            chosen = next(
                (
                    c
                    for c in review_candidates(workflow_id=workflow.id)
                    if candidate_public_id(c) == candidate_id
                ),
                None,
            )
            if chosen is None:
                raise UnknownCandidate(candidate_id)
            internal_patient_id = chosen.internal_patient_id
        return link_review_resolve(
            workflow_id=workflow.id,
            internal_patient_id=internal_patient_id,
            actor=actor,
            reason=reason.strip() or "decided by the customer",
        )
