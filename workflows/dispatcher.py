"""The dispatcher: publishes the queue message of every accepted workflow.

Design decision 2's outbox. The ack path only writes to PostgreSQL: its single statement inserts
the workflow and calls pg_notify with the workflow's queue message (ids only), which PostgreSQL
delivers when, and only if, the transaction commits. The dispatcher LISTENs on that channel and
publishes whatever arrived together in one batch through the pooled producer. The web process
no longer publishes on a background thread (18% of its CPU per ack in `make bench`'s profile),
and a stalled broker costs the ack nothing.

Every Celery worker runs one (config/celery.py) and `manage.py workflows_dispatch` runs one on
its own; a session advisory lock makes exactly one of them the leader, so each notification is
published once. When the leader dies its connection closes, the lock is released, and another
takes over within LEADER_RETRY_SECONDS; notifications sent meanwhile had no listener, so a new
leader first publishes every RECEIVED workflow younger than RECONCILE_STALE_AFTER_SECONDS (older
ones are the reconciliation sweep's). Duplicates are harmless: consumers claim the row.
"""

import json
import logging
import threading
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

from config import metrics
from workflows.models import Status, Workflow
from workflows.services.workflows import (
    WORKFLOW_CHANNEL,
    workflow_message,
    workflow_messages_publish,
)

logger = logging.getLogger(__name__)

# Messages published in one Redis round trip at most.
BATCH_SIZE = 500
# How often a follower tries to become the leader.
LEADER_RETRY_SECONDS = 5.0
# Longest wait between two attempts, to reconnect to PostgreSQL or to publish a refused batch.
_BACKOFF_MAX = 30.0
_LOCK = "workflows.dispatcher"
_MESSAGE_KEYS = frozenset(workflow_message(workflow=Workflow()))

_CATCH_UP_SQL = (
    f"SELECT id, request_id, customer_id, patient_id, request_type, updated_at "  # noqa: S608
    f"FROM {Workflow._meta.db_table} "
    "WHERE status = %s AND updated_at > now() - make_interval(secs => %s) "
    "AND (updated_at, id) > (%s, %s) ORDER BY updated_at, id LIMIT %s"
)


class Dispatcher:
    """Run with run() on a thread or a process of its own; stop() ends it within poll_seconds."""

    def __init__(self, *, poll_seconds: float = 1.0) -> None:
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        # Set while this dispatcher holds the lock and listens (tests and the command wait on it).
        self.leading = threading.Event()
        self.published = 0

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Lead or wait to lead, until stopped; a lost connection is opened again."""
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self._session()
                backoff = 1.0
            except Exception as exc:
                # PostgreSQL restarted, the network dropped: the lock went with the session.
                logger.warning(
                    "dispatcher: %s; reconnecting in %.0f s", type(exc).__name__, backoff
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            finally:
                if self.leading.is_set():
                    self.leading.clear()
                    metrics.dispatcher_leading(False)

    def _session(self) -> None:
        # A connection of its own, outside Django's per-thread handler, configured as Django's
        # (the same OPTIONS) and in autocommit, as LISTEN needs.
        wrapper = connections.create_connection(DEFAULT_DB_ALIAS)
        try:
            wrapper.ensure_connection()
            conn = wrapper.connection
            if not self._lead(conn):
                return
            conn.execute(f"LISTEN {WORKFLOW_CHANNEL}")
            self.leading.set()
            metrics.dispatcher_leading(True)
            logger.info("dispatcher: leading")
            self._catch_up(conn)
            while not self._stop.is_set():
                batch = self._next_batch(conn)
                if batch:
                    self._publish(batch)
        finally:
            wrapper.close()

    def _lead(self, conn: Any) -> bool:
        while not self._stop.is_set():
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", [_LOCK]
            ).fetchone()
            if row and row[0]:
                return True
            self._stop.wait(LEADER_RETRY_SECONDS)
        return False

    def _next_batch(self, conn: Any) -> list[dict[str, str]]:
        """The messages announced so far: waits up to poll_seconds for the first, then takes what
        has already arrived, up to BATCH_SIZE."""
        batch: list[dict[str, str]] = []
        timeout = self.poll_seconds
        while len(batch) < BATCH_SIZE:
            before = len(batch)
            for notify in conn.notifies(timeout=timeout, stop_after=BATCH_SIZE - len(batch)):
                message = _message(notify.payload)
                if message is not None:
                    batch.append(message)
            if len(batch) == before:
                break
            timeout = 0  # drain what is already there, without waiting for more
        return batch

    def _catch_up(self, conn: Any) -> None:
        """Publish the recent RECEIVED workflows: their notifications may have had no listener."""
        after: tuple[Any, Any] = ("-infinity", "00000000-0000-0000-0000-000000000000")
        total = 0
        while not self._stop.is_set():
            rows = conn.execute(
                _CATCH_UP_SQL,
                [
                    Status.RECEIVED.value,
                    settings.RECONCILE_STALE_AFTER_SECONDS,
                    *after,
                    BATCH_SIZE,
                ],
            ).fetchall()
            if not rows:
                break
            self._publish(
                [
                    workflow_message(
                        workflow=Workflow(
                            id=id_,
                            request_id=request_id,
                            customer_id=customer_id,
                            patient_id=patient_id,
                            request_type=request_type,
                        )
                    )
                    for id_, request_id, customer_id, patient_id, request_type, _ in rows
                ]
            )
            total += len(rows)
            after = (rows[-1][5], rows[-1][0])
        if total:
            logger.info("dispatcher: caught up with %d received workflows", total)

    def _publish(self, batch: list[dict[str, str]]) -> None:
        """Publish, retrying while the broker refuses: the notifications that arrive meanwhile
        wait in PostgreSQL's queue. Given up only when stopped (the next leader catches up)."""
        backoff = 0.5
        while not self._stop.is_set():
            if workflow_messages_publish(messages=batch) == len(batch):
                self.published += len(batch)
                metrics.dispatcher_published(len(batch))
                return
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)


def _message(payload: str) -> dict[str, str] | None:
    """The queue message an announcement carries; None (logged) for anything else sent on the
    channel, which no code of ours sends."""
    try:
        message = json.loads(payload)
    except ValueError:
        message = None
    if not isinstance(message, dict) or set(message) != _MESSAGE_KEYS:
        logger.warning("dispatcher: ignored a notification that is not a workflow message")
        return None
    return {key: str(value) for key, value in message.items()}
