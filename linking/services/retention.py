"""The request data after acceptance: re-encrypted under a new key, purged after retention.

The request data (the demographics) is needed until the workflow ends; an operator may re-queue
a FAILED workflow for a while after that. Past REQUEST_DATA_RETENTION_DAYS it is deleted (the
seed: "the request data can be archived after linking"); a workflow re-queued after the purge
fails with "request data missing" and the customer is told.
"""

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field

from cryptography.fernet import InvalidToken
from django.conf import settings
from django.db import transaction
from django.db.models import TextField, Value
from django.db.models.functions import Cast
from django.utils import timezone

from linking.fields import FERNET_PREFIX, EncryptedJSONDocumentField
from linking.models import LinkRequest
from workflows.models import TERMINAL_STATES, Workflow

logger = logging.getLogger(__name__)


@dataclass
class RotationReport:
    rotated: int = 0  # now under the first key (including rows found in clear)
    current: int = 0  # already under the first key: left alone
    unreadable: list[uuid.UUID] = field(default_factory=list)  # no configured key opens them

    def as_dict(self) -> dict[str, object]:
        return {
            "rotated": self.rotated,
            "current": self.current,
            "unreadable": [str(i) for i in self.unreadable],
        }


def _data_field() -> EncryptedJSONDocumentField:
    data = LinkRequest._meta.get_field("data")
    assert isinstance(data, EncryptedJSONDocumentField)
    return data


def request_data_rotate_key(*, batch_size: int = 500) -> RotationReport:
    """Re-encrypt every request under the first of REQUEST_DATA_KEYS (with SECRET_KEY).

    Idempotent and resumable: a row the first key already opens is left as it is, so a second
    run changes nothing. Rows written in clear (before the encryption migration, by an old
    instance during that deploy) are encrypted. Rows no configured key opens are reported,
    never changed: the key they need must not be dropped yet.
    """
    data = _data_field()
    primary, keyring = data.primary, data.keyring
    report = RotationReport()
    last: uuid.UUID | None = None
    while True:
        # The stored token as text: reading `data` itself would decrypt it.
        rows = LinkRequest.objects.annotate(token=Cast("data", output_field=TextField()))
        if last is not None:
            rows = rows.filter(request_id__gt=last)
        batch = list(rows.order_by("request_id").values_list("request_id", "token")[:batch_size])
        if not batch:
            return report
        last = batch[-1][0]
        updates: list[tuple[uuid.UUID, str]] = []
        for request_id, token in batch:
            if not token.startswith(FERNET_PREFIX):
                updates.append((request_id, data.encrypt_text(token)))
                continue
            try:
                primary.extract_timestamp(token.encode("ascii"))  # checks the MAC only
            except InvalidToken:
                pass
            else:
                report.current += 1
                continue
            try:
                updates.append((request_id, keyring.rotate(token.encode("ascii")).decode()))
            except InvalidToken:
                report.unreadable.append(request_id)
        with transaction.atomic():
            for request_id, new_token in updates:
                # A row purged meanwhile updates nothing, which is what it should do.
                LinkRequest.objects.filter(request_id=request_id).update(
                    data=Value(new_token, output_field=TextField())
                )
        report.rotated += len(updates)


def request_data_purge_expired(
    *,
    now: dt.datetime | None = None,
    retention_days: int | None = None,
    batch_size: int = 500,
) -> int:
    """Delete the request data of workflows that ended (COMPLETED or FAILED) more than
    `retention_days` (default REQUEST_DATA_RETENTION_DAYS) ago; returns how many were deleted.

    A workflow in REVIEW, or any other pending state, keeps its data whatever its age. The
    workflow rows are locked (skipping locked ones) while their data is deleted, so an operator's
    re-queue of a FAILED workflow either happens first (and the data stays) or waits and then
    finds no data (and the workflow fails with "request data missing").
    """
    now = now or timezone.now()
    days = settings.REQUEST_DATA_RETENTION_DAYS if retention_days is None else retention_days
    cutoff = now - dt.timedelta(days=days)
    purged = 0
    while True:
        with transaction.atomic():
            request_ids = list(
                Workflow.objects.select_for_update(skip_locked=True)
                .filter(
                    status__in=TERMINAL_STATES,
                    updated_at__lt=cutoff,
                    request_id__in=LinkRequest.objects.values("request_id"),
                )
                .order_by()
                .values_list("request_id", flat=True)[:batch_size]
            )
            if request_ids:
                deleted, _ = LinkRequest.objects.filter(request_id__in=request_ids).delete()
                purged += deleted
        if len(request_ids) < batch_size:
            break
    if purged:
        logger.info("request data purged: %d", purged)
    return purged
