"""Processing a link request (seed 3.3): claim, search, decide, record, complete, notify."""

import logging
import random
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from linking.internal_search import InternalSearchError, internal_search_match
from linking.models import LinkRequest, MappingStatus, PatientMapping
from linking.policy import Decision, link_decide
from linking.services.links import link_created_event, link_history_record
from workflows.models import Status, Workflow
from workflows.services import workflow_claim, workflow_finish, workflow_transition

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
    caller finds the workflow claimed or finished and does nothing."""
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
    request = LinkRequest.objects.filter(request_id=workflow.request_id).first()
    if request is None:
        _finish(workflow, name="fail", reason="request data missing")
        return DONE
    try:
        candidates = internal_search_match(request.data["patient"])
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
    decision = link_decide(
        candidates, min_score=settings.AUTO_LINK_SCORE, margin=settings.AUTO_LINK_MARGIN
    )
    _record(workflow, decision)
    return DONE


def _still_ours(workflow: Workflow) -> Workflow | None:
    """Re-read under lock; None if another consumer took the workflow over meanwhile."""
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


def _linked_elsewhere(workflow: Workflow) -> bool:
    return PatientMapping.objects.filter(
        customer_id=workflow.customer_id,
        customer_patient_id=workflow.patient_id,
        status=MappingStatus.LINKED,
    ).exists()


def _record(workflow: Workflow, decision: Decision) -> None:
    """Mapping, LINKED | NO_RESULTS, COMPLETED and the webhook row: one transaction."""
    with transaction.atomic():
        current = _still_ours(workflow)
        if current is None:
            return
        candidate = decision.candidate
        if candidate is not None and _linked_elsewhere(current):
            current = workflow_transition(
                workflow=current,
                name="mark_no_results",
                actor=ACTOR,
                reason="patient already linked by another workflow",
            )
        elif candidate is not None:
            mapping = PatientMapping.objects.create(
                customer_id=current.customer_id,
                customer_patient_id=current.patient_id,
                internal_patient_id=candidate.internal_patient_id,
                status=MappingStatus.LINKED,
                workflow=current,
                score=candidate.score,
                match_grade=candidate.grade,
                updated_at=timezone.now(),
            )
            link_history_record(
                mapping=mapping,
                event=link_created_event(mapping=mapping),
                actor=ACTOR,
                reason=decision.reason,
            )
            current = workflow_transition(
                workflow=current, name="mark_linked", actor=ACTOR, reason=decision.reason
            )
        else:
            current = workflow_transition(
                workflow=current, name="mark_no_results", actor=ACTOR, reason=decision.reason
            )
        workflow_finish(workflow=current, name="complete", actor=ACTOR)
