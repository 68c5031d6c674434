"""Processing a link request (seed 3.3): claim, search, decide, record, complete, notify."""

import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any, cast

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from config.sql import insert_select
from linking.fields import EncryptedJSONDocumentField
from linking.internal_search import (
    Candidate,
    InternalSearchError,
    SearchJobLost,
    SearchRequested,
    internal_search_match,
    internal_search_poll,
)
from linking.models import (
    LinkEvent,
    LinkRequest,
    MappingStatus,
    PatientMapping,
    SearchCandidate,
)
from linking.policy import Bands, Outcome, link_decide
from linking.services.links import link_history_new
from merchant.models import Customer
from workflows.models import Status, Workflow
from workflows.services import (
    Step,
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


# The request's data and its customer in one round trip, raw: this is every workflow's hot path,
# and the ORM's select_related() cost more to build than the query costs to run (`make bench`).
_REQUEST = (
    "SELECT c.*, r.data AS request_data FROM linking_linkrequest r"
    " JOIN merchant_customer c ON c.id = r.customer_id WHERE r.request_id = %s"
)
_REQUEST_DATA = cast(EncryptedJSONDocumentField, LinkRequest._meta.get_field("data"))


def _request_data(workflow: Workflow) -> dict[str, Any] | None:
    """The request's data (decrypted), or None if it is gone. The ending needs the customer
    (its bands, its webhook): it is read here, with the data, and kept on the workflow."""
    customer = next(iter(Customer.objects.raw(_REQUEST, [workflow.request_id])), None)
    if customer is None:
        return None
    workflow.customer = customer
    # The extra column is an attribute of the raw query's instance, still as stored (encrypted):
    # taken off it, so that the customer, which stays on the workflow, carries no request data.
    stored = vars(customer).pop("request_data")
    data: dict[str, Any] = _REQUEST_DATA.from_db_value(stored, None, connection)
    return data


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
    data = _request_data(workflow)
    if data is None:
        raise _RequestMissing()
    return internal_search_match(data["patient"])


# The row as it is now, locked: raw, because this is every workflow's hot path and the ORM's
# select_for_update() costs more to build than the statement costs to run.
_LOCK = "SELECT * FROM workflows_workflow WHERE id = %s FOR UPDATE"


def _still_ours(workflow: Workflow) -> Workflow | None:
    """Re-read under lock; None if another consumer (or a search callback) took the workflow
    over meanwhile, or it is gone."""
    current = next(iter(Workflow.objects.raw(_LOCK, [workflow.id])), None)
    if current is None or (current.status, current.claim_id) != (
        workflow.status,
        workflow.claim_id,
    ):
        logger.info("workflow %s was taken over; dropping this attempt", workflow.id)
        return None
    if Workflow.customer.is_cached(workflow):
        current.customer = workflow.customer
    return current


def _finish(workflow: Workflow, *, name: str, reason: str = "") -> None:
    with transaction.atomic():
        current = _still_ours(workflow)
        if current is not None:
            workflow_finish(workflow=current, name=name, actor=ACTOR, reason=reason)


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
        outcome = Step("mark_no_results", decision.reason)
    else:
        outcome = link_record(
            workflow=workflow,
            candidate=decision.candidate,
            actor=actor,
            reason=decision.reason,
        )
    return workflow_finish(workflow=workflow, name="complete", actor=actor, first=[outcome])


# The mapping and its history line in one statement: not when the patient is linked already,
# and `relinked` when it was linked before and de-linked since.
_LINK = """
WITH earlier AS (
  SELECT status FROM linking_patientmapping
   WHERE customer_id = %(customer)s AND customer_patient_id = %(patient)s
     AND status IN (%(linked)s, %(delinked)s)
), mapping AS (
  {mapping} WHERE NOT EXISTS (SELECT 1 FROM earlier WHERE status = %(linked)s) RETURNING id
), history AS (
  {history} FROM mapping
)
SELECT count(*) FROM mapping
"""
_HISTORY_COMPUTED = {
    "mapping_id": "mapping.id",
    "event": "CASE WHEN EXISTS (SELECT 1 FROM earlier WHERE status = %(delinked)s)"
    " THEN %(relinked)s ELSE %(linked_event)s END",
}


def link_record(*, workflow: Workflow, candidate: Candidate, actor: str, reason: str) -> Step:
    """The mapping and its history line; the step the caller applies with the ending (it holds
    the transaction and the row lock): LINKED.

    A patient linked meanwhile by another workflow (possible only through an operator's actions
    on old workflows) is not linked twice: the step is NO_RESULTS and says why."""
    now = timezone.now()
    mapping = PatientMapping(
        customer_id=workflow.customer_id,
        customer_patient_id=workflow.patient_id,
        internal_patient_id=candidate.internal_patient_id,
        status=MappingStatus.LINKED,
        workflow=workflow,
        score=candidate.score,
        match_grade=candidate.grade,
        created_at=now,
        updated_at=now,
    )
    history = link_history_new(
        mapping=mapping, event=LinkEvent.LINKED, actor=actor, reason=reason, at=now
    )
    mapping_sql, params = insert_select(mapping, name="mapping")
    history_sql, history_params = insert_select(history, name="history", computed=_HISTORY_COMPUTED)
    params |= history_params | {
        "customer": workflow.customer_id,
        "patient": workflow.patient_id,
        "linked": MappingStatus.LINKED.value,
        "delinked": MappingStatus.DELINKED.value,
        "relinked": LinkEvent.RELINKED.value,
        "linked_event": LinkEvent.LINKED.value,
    }
    with connection.cursor() as cursor:
        cursor.execute(_LINK.format(mapping=mapping_sql, history=history_sql), params)
        row = cursor.fetchone()
    if not row or row[0] != 1:
        return Step("mark_no_results", "patient already linked by another workflow")
    return Step("mark_linked", reason)
