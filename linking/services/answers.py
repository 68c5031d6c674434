"""What a search's answer means for a link workflow, and writing answers down.

The consumer (linking/services/process.py) and an asynchronous search's callback
(linking/services/search_results.py) both end here: link_search_answer applies the linking
policy to the candidates, link_answers_save writes any number of answers in a few statements
(candidates, mappings with their history, the workflows' steps, the deliveries), and an
operator's review decision links through link_record.
"""

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from django.conf import settings
from django.db import connection
from django.utils import timezone

from linking import statements
from linking.agreement import candidate_agreement
from linking.fields import EncryptedJSONDocumentField
from linking.internal_search import Candidate
from linking.models import LinkRequest
from linking.policy import Bands, Outcome, link_decide
from merchant.models import ReviewBy
from workflows import statements as workflow_statements
from workflows.models import Status, WebhookDelivery, Workflow
from workflows.services import Step, WorkflowChange, workflows_ended, workflows_save
from workflows.services.webhooks import webhook_event_new

REVIEW_REQUIRED = "link.review_required"

# The request's data stays encrypted until a search needs it.
_REQUEST_DATA = cast(EncryptedJSONDocumentField, LinkRequest._meta.get_field("data"))


def stored_request_data(workflow: Workflow) -> dict[str, Any] | None:
    """The request data the batch's read left on the workflow (process._load_requests),
    decrypted; None when there was none (purged, or no batch read)."""
    stored = getattr(workflow, "_request_data", None)
    if stored is None:
        return None
    return cast(dict[str, Any], _REQUEST_DATA.from_db_value(stored, None, connection))


@dataclass
class LinkAnswer:
    """What one workflow's attempt came to: the change to save, and for a search that answered,
    its candidates (stored) and the one to link."""

    workflow: Workflow
    steps: list[Step] = field(default_factory=list)
    release: bool = False
    candidates: Sequence[Candidate] = ()
    link: Candidate | None = None
    link_reason: str = ""


def link_search_answer(*, workflow: Workflow, candidates: list[Candidate]) -> LinkAnswer:
    """What a search's candidates mean for the workflow (the linking policy): link and
    complete, send to review, or end with no match."""
    decision = link_decide(candidates, bands=Bands.for_customer(workflow.customer))
    kept = candidates[: settings.INTERNAL_SEARCH_COUNT]
    if decision.outcome == Outcome.REVIEW:
        patient = _request_patient(workflow)
        if patient is not None:
            # What a reviewing customer may see of each candidate: stored with the candidates.
            kept = [replace(c, agreement=candidate_agreement(patient, c.resource)) for c in kept]
        return LinkAnswer(
            workflow, [Step("request_review", decision.reason)], release=True, candidates=kept
        )
    if decision.candidate is None:
        steps = [Step("mark_no_results", decision.reason), Step("complete")]
        return LinkAnswer(workflow, steps, candidates=kept)
    return LinkAnswer(
        workflow, candidates=kept, link=decision.candidate, link_reason=decision.reason
    )


def _request_patient(workflow: Workflow) -> dict[str, Any] | None:
    """The patient the customer sent: from the batch's read when there was one, else read."""
    data = stored_request_data(workflow)
    if data is not None:
        return cast(dict[str, Any], data["patient"])
    request = LinkRequest.objects.filter(request_id=workflow.request_id).first()
    return None if request is None else cast(dict[str, Any], request.data["patient"])


def link_answers_save(*, answers: Sequence[LinkAnswer], actor: str) -> list[WebhookDelivery]:
    """Write these answers (caller holds the transaction and the rows' locks): the candidates,
    the mappings and their history, then every workflow's steps and the deliveries of those
    that end, each a single statement for all of them. A patient linked meanwhile by another
    workflow is not linked twice: that workflow ends NO_RESULTS and says why."""
    if not answers:
        return []
    now = timezone.now()
    rows: dict[str, list[Any]] = {
        k: []
        for k in ("workflow", "attempt", "rank", "internal", "score", "grade", "agreement", "at")
    }
    for answer in answers:
        for rank, candidate in enumerate(answer.candidates, start=1):
            for name, value in (
                ("workflow", answer.workflow.id),
                ("attempt", answer.workflow.attempts),
                ("rank", rank),
                ("internal", candidate.internal_patient_id),
                ("score", candidate.score),
                ("grade", candidate.grade),
                (
                    "agreement",
                    None if candidate.agreement is None else json.dumps(candidate.agreement),
                ),
                ("at", now),
            ):
                rows[name].append(value)
    if rows["workflow"]:
        workflow_statements.execute(statements.CANDIDATES, rows)
    linking = [a for a in answers if a.link is not None]
    linked = links_record(
        links=[(a.workflow, cast(Candidate, a.link), a.link_reason) for a in linking], actor=actor
    )
    for answer in linking:
        if answer.workflow.id in linked:
            answer.steps = [Step("mark_linked", answer.link_reason), Step("complete")]
        else:
            answer.steps = [
                Step("mark_no_results", "patient already linked by another workflow"),
                Step("complete"),
            ]
    saved = workflows_save(
        changes=[WorkflowChange(a.workflow, a.steps, release=a.release) for a in answers],
        actor=actor,
    )
    reviews = [
        review_required_new(workflow=w)
        for w in saved.workflows
        if w.status == Status.REVIEW and w.customer.review_by == ReviewBy.CUSTOMER
    ]
    if reviews:
        WebhookDelivery.objects.bulk_create(reviews)
    return saved.deliveries + reviews


def review_required_new(*, workflow: Workflow) -> WebhookDelivery:
    """`link.review_required`, to a customer who decides its own reviews (not saved yet)."""
    return webhook_event_new(
        workflow=workflow,
        event_type=REVIEW_REQUIRED,
        data={
            "workflow-id": str(workflow.id),
            "status": Status.REVIEW.value,
            "customer-patient-id": str(workflow.patient_id),
        },
    )


def links_record(*, links: Sequence[tuple[Workflow, Candidate, str]], actor: str) -> set[uuid.UUID]:
    """The mapping and its history line of each (workflow, candidate, reason), in one
    statement; the workflows that linked (not those whose patient is linked already)."""
    if not links:
        return set()
    params: dict[str, Any] = {
        k: [] for k in ("workflow", "customer", "patient", "internal", "score", "grade", "reason")
    }
    for workflow, candidate, reason in links:
        for name, value in (
            ("workflow", workflow.id),
            ("customer", workflow.customer_id),
            ("patient", workflow.patient_id),
            ("internal", candidate.internal_patient_id),
            ("score", candidate.score),
            ("grade", candidate.grade),
            ("reason", reason),
        ):
            params[name].append(value)
    params |= {"now": timezone.now(), "actor": actor}
    return {row[0] for row in workflow_statements.execute(statements.LINK, params)}


def link_record(*, workflow: Workflow, candidate: Candidate, actor: str, reason: str) -> Step:
    """The mapping and its history line; the step the caller applies with the ending (it holds
    the transaction and the row lock): LINKED, or NO_RESULTS when the patient is linked by
    another workflow already."""
    if workflow.id in links_record(links=[(workflow, candidate, reason)], actor=actor):
        return Step("mark_linked", reason)
    return Step("mark_no_results", "patient already linked by another workflow")


def link_search_apply(*, workflow: Workflow, candidates: list[Candidate], actor: str) -> Workflow:
    """Store a search's candidates and act on them: link and complete, send to review, or end
    with no match (an asynchronous search's callback). The caller holds the workflow's row lock
    inside a transaction, and has checked that the workflow still waits for this answer; the
    customer is told after the commit."""
    answer = link_search_answer(workflow=workflow, candidates=candidates)
    workflows_ended(deliveries=link_answers_save(answers=[answer], actor=actor), send=False)
    return workflow
