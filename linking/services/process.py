"""Processing a link request (seed 3.3): claim, search, decide, record, complete, notify."""

import logging
import random
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from linking.internal_search import (
    Candidate,
    InternalSearchError,
    SearchJobLost,
    SearchRequested,
    internal_search_match,
    internal_search_poll,
)
from linking.models import LinkRequest, MappingStatus, PatientMapping, SearchCandidate
from linking.policy import Bands, Outcome, link_decide
from linking.services.links import link_created_event, link_history_record
from workflows.models import Status, Workflow
from workflows.services import (
    workflow_claim,
    workflow_finish,
    workflow_release,
    workflow_transition,
)

logger = logging.getLogger(__name__)

ACTOR = "worker"


@dataclass(frozen=True)
class ProcessOutcome:
    """What the task should do next: nothing, or retry after `retry_in` seconds."""

    retry_in: float | None = None
    claim_id: uuid.UUID | None = None


DONE = ProcessOutcome()


def retry_backoff(attempt: int, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter, at least what the server asked for, capped."""
    ceiling = min(
        settings.RETRY_BACKOFF_MAX_SECONDS, settings.RETRY_BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)
    )
    wait = random.uniform(ceiling / 2, ceiling)  # noqa: S311 -- jitter, not security
    if retry_after is not None:
        wait = max(wait, retry_after)
    return min(wait, settings.RETRY_BACKOFF_MAX_SECONDS)


def link_process(
    *, workflow_id: str | uuid.UUID, claim_id: uuid.UUID | None = None
) -> ProcessOutcome:
    """Run one attempt at a link workflow. Safe to call twice for the same message: a second
    caller finds the workflow claimed or finished and does nothing.

    A REQUESTED workflow (an asynchronous search that sent no callback in time) is polled
    instead of searched again."""
    workflow = workflow_claim(workflow_id=workflow_id, claim_id=claim_id, actor=ACTOR)
    if workflow is None:
        return DONE
    if workflow.status in (Status.LINKED, Status.NO_RESULTS):
        # Decided by an earlier attempt that died before completing: only the ending is left.
        _finish(workflow, name="complete")
        return DONE
    if workflow.attempts > settings.WORKFLOW_MAX_ATTEMPTS:
        _finish(
            workflow,
            name="fail",
            reason=f"attempt limit reached ({workflow.attempts - 1} attempts)",
        )
        return DONE
    try:
        answer = _search(workflow)
    except _RequestMissing:
        _finish(workflow, name="fail", reason="request data missing")
        return DONE
    except InternalSearchError as exc:
        if exc.permanent:
            _finish(workflow, name="fail", reason=exc.reason)
            return DONE
        if workflow.attempts >= settings.WORKFLOW_MAX_ATTEMPTS:
            _finish(workflow, name="fail", reason=f"attempt limit reached: {exc.reason}")
            return DONE
        logger.info("workflow %s: %s; retrying", workflow.id, exc.reason)
        return ProcessOutcome(
            retry_in=retry_backoff(workflow.attempts, exc.retry_after), claim_id=workflow.claim_id
        )
    with transaction.atomic():
        current = _still_ours(workflow)
        if current is None:
            return DONE
        if isinstance(answer, SearchRequested):
            current = workflow_transition(
                workflow=current,
                name="request_search",
                actor=ACTOR,
                reason="asynchronous search accepted",
                search_id=answer.search_id,
            )
            workflow_release(workflow=current)
        elif answer is None:
            # Still running on the internal side: the callback, or the sweep's next poll, ends it.
            workflow_release(workflow=current)
        else:
            link_search_apply(workflow=current, candidates=answer, actor=ACTOR)
    return DONE


class _RequestMissing(Exception):
    pass


def _search(workflow: Workflow) -> list[Candidate] | SearchRequested | None:
    """The search's answer: candidates, a job the internal system made of it, or None for a
    polled job still pending."""
    if workflow.status == Status.REQUESTED and workflow.search_id:
        try:
            return internal_search_poll(workflow.search_id)
        except SearchJobLost:
            logger.info("workflow %s: search job lost; searching again", workflow.id)
    request = LinkRequest.objects.filter(request_id=workflow.request_id).first()
    if request is None:
        raise _RequestMissing()
    return internal_search_match(request.data["patient"])


def _still_ours(workflow: Workflow) -> Workflow | None:
    """Re-read under lock; None if another consumer (or a search callback) took the workflow
    over meanwhile."""
    current = (
        Workflow.objects.select_for_update(of=("self",))
        .select_related("customer")
        .get(id=workflow.id)
    )
    if current.status != workflow.status or current.claim_id != workflow.claim_id:
        logger.info("workflow %s was taken over; dropping this attempt", workflow.id)
        return None
    return current


def _finish(workflow: Workflow, *, name: str, reason: str = "") -> None:
    with transaction.atomic():
        current = _still_ours(workflow)
        if current is not None:
            workflow_finish(workflow=current, name=name, actor=ACTOR, reason=reason)


def linked_elsewhere(workflow: Workflow) -> bool:
    return PatientMapping.objects.filter(
        customer_id=workflow.customer_id,
        customer_patient_id=workflow.patient_id,
        status=MappingStatus.LINKED,
    ).exists()


def link_search_apply(*, workflow: Workflow, candidates: list[Candidate], actor: str) -> Workflow:
    """Store a search's candidates and act on them: link and complete, send to review, or end
    with no match. The caller holds the workflow's row lock inside a transaction, and has
    checked that the workflow still waits for this answer (IN_PROGRESS or REQUESTED)."""
    SearchCandidate.objects.bulk_create(
        SearchCandidate(
            workflow=workflow,
            attempt=workflow.attempts,
            rank=rank,
            internal_patient_id=candidate.internal_patient_id,
            score=candidate.score,
            match_grade=candidate.grade,
        )
        for rank, candidate in enumerate(candidates[: settings.INTERNAL_SEARCH_COUNT], start=1)
    )
    decision = link_decide(candidates, bands=Bands.for_customer(workflow.customer))
    if decision.outcome == Outcome.REVIEW:
        workflow = workflow_transition(
            workflow=workflow, name="request_review", actor=actor, reason=decision.reason
        )
        workflow_release(workflow=workflow)
        return workflow
    if decision.candidate is None:
        workflow = workflow_transition(
            workflow=workflow, name="mark_no_results", actor=actor, reason=decision.reason
        )
    else:
        workflow = link_record(
            workflow=workflow,
            candidate=decision.candidate,
            actor=actor,
            reason=decision.reason,
        )
    return workflow_finish(workflow=workflow, name="complete", actor=actor)


def link_record(*, workflow: Workflow, candidate: Candidate, actor: str, reason: str) -> Workflow:
    """The mapping, its history row and LINKED (caller holds the transaction and the row lock).

    A patient linked meanwhile by another workflow (possible only through an operator's actions
    on old workflows) is not linked twice: the workflow ends NO_RESULTS and says why."""
    if linked_elsewhere(workflow):
        return workflow_transition(
            workflow=workflow,
            name="mark_no_results",
            actor=actor,
            reason="patient already linked by another workflow",
        )
    mapping = PatientMapping.objects.create(
        customer_id=workflow.customer_id,
        customer_patient_id=workflow.patient_id,
        internal_patient_id=candidate.internal_patient_id,
        status=MappingStatus.LINKED,
        workflow=workflow,
        score=candidate.score,
        match_grade=candidate.grade,
        updated_at=timezone.now(),
    )
    link_history_record(
        mapping=mapping, event=link_created_event(mapping=mapping), actor=actor, reason=reason
    )
    return workflow_transition(workflow=workflow, name="mark_linked", actor=actor, reason=reason)
