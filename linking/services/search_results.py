"""Results of asynchronous internal searches (contract section 2), by callback or by poll."""

import logging
import uuid
from dataclasses import dataclass

from django.db import transaction

from linking.internal_search import Candidate
from linking.services.process import link_search_apply
from workflows.models import Status, Workflow

logger = logging.getLogger(__name__)

CALLBACK_ACTOR = "search-callback"


class SearchUnknown(Exception):
    """No workflow waits for this search id (yet: the callback may beat our own commit)."""


@dataclass(frozen=True)
class SearchResultReceipt:
    workflow_id: uuid.UUID
    # False: the workflow had already moved on (the sweep's poll won the race); nothing changed.
    applied: bool
    status: str


def link_search_result(
    *, search_id: str, candidates: list[Candidate], actor: str = CALLBACK_ACTOR
) -> SearchResultReceipt:
    """Apply the result of the search `search_id` to the workflow waiting for it, once.

    The row lock orders a callback and a poll of the same job: whichever comes second finds
    the workflow no longer REQUESTED and changes nothing."""
    with transaction.atomic():
        workflow = (
            Workflow.objects.select_for_update(of=("self",))
            .select_related("customer")
            .filter(search_id=search_id)
            .first()
        )
        if workflow is None:
            raise SearchUnknown(search_id)
        if workflow.status != Status.REQUESTED:
            logger.info(
                "workflow %s: search result after %s; ignored", workflow.id, workflow.status
            )
            return SearchResultReceipt(workflow.id, applied=False, status=workflow.status)
        workflow = link_search_apply(workflow=workflow, candidates=candidates, actor=actor)
        return SearchResultReceipt(workflow.id, applied=True, status=workflow.status)
