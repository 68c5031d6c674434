"""Results of asynchronous internal searches (contract section 2), by callback or by poll."""

import datetime as dt
import logging
import uuid
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from linking.internal_search import Candidate
from linking.models import SearchCallback
from linking.services.answers import link_search_apply
from workflows.models import Status, Workflow

logger = logging.getLogger(__name__)

CALLBACK_ACTOR = "search-callback"
# A callback's signature is accepted for 5 minutes; its webhook-id is kept far longer than that.
CALLBACK_ID_RETENTION = dt.timedelta(days=1)


class CallbackReplayed(Exception):
    """This callback's `webhook-id` was already used for another search."""


class SearchUnknown(Exception):
    """No workflow waits for this search id (yet: the callback may beat our own commit)."""


@dataclass(frozen=True)
class SearchResultReceipt:
    workflow_id: uuid.UUID
    # False: the workflow had already moved on (the sweep's poll won the race); nothing changed.
    applied: bool
    status: str


def link_search_result(
    *,
    search_id: str,
    candidates: list[Candidate],
    webhook_id: str | None = None,
    actor: str = CALLBACK_ACTOR,
) -> SearchResultReceipt:
    """Apply the result of the search `search_id` to the workflow waiting for it, once.

    The row lock orders a callback and a poll of the same job: whichever comes second finds
    the workflow no longer REQUESTED and changes nothing. A callback's `webhook_id` is bound
    to its search (CallbackReplayed if it was used for another one)."""
    with transaction.atomic():
        if webhook_id is not None:
            seen, _ = SearchCallback.objects.get_or_create(
                webhook_id=webhook_id, defaults={"search_id": search_id}
            )
            if seen.search_id != search_id:
                raise CallbackReplayed(webhook_id)
        workflow = (
            Workflow.objects.select_for_update(of=("self",))
            .select_related("customer")
            .filter(search_id=search_id)
            .first()
        )
        if workflow is None:
            # Rolls the webhook-id back too: the internal system's retry must not be refused.
            raise SearchUnknown(search_id)
        if workflow.status != Status.REQUESTED:
            logger.info(
                "workflow %s: search result after %s; ignored", workflow.id, workflow.status
            )
            return SearchResultReceipt(workflow.id, applied=False, status=workflow.status)
        workflow = link_search_apply(workflow=workflow, candidates=candidates, actor=actor)
        return SearchResultReceipt(workflow.id, applied=True, status=workflow.status)


def search_callbacks_purge(*, now: dt.datetime | None = None) -> int:
    """Forget callback ids whose signatures expired long ago; returns how many."""
    cutoff = (now or timezone.now()) - CALLBACK_ID_RETENTION
    deleted, _ = SearchCallback.objects.filter(received_at__lt=cutoff).delete()
    return deleted
