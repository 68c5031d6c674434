"""The dispatcher: publishes the queue message of every accepted workflow.

The outbox. The ack path only writes to PostgreSQL: its single statement inserts
the workflow and calls pg_notify with the workflow's queue message (ids only), which PostgreSQL
delivers when, and only if, the transaction commits. The dispatcher LISTENs on that channel and
publishes what arrived together as messages of WORKER_BATCH_SIZE workflow ids each, the unit of
work of the consumers. The web process never publishes, and a stalled broker costs the ack
nothing.

Every Celery worker runs one (config/celery.py) and `manage.py dispatch` runs one on
its own; a session advisory lock makes exactly one of them the leader, so each notification is
published once. When the leader dies its connection closes, the lock is released, and another
takes over within LEADER_RETRY_SECONDS; notifications sent meanwhile had no listener, so a new
leader first publishes every RECEIVED workflow younger than RECONCILE_STALE_AFTER_SECONDS (older
ones are the reconciliation sweep's). Duplicates are harmless: consumers claim the row.

Hand-written: Celery has no outbox (`transaction.on_commit` + `delay()` loses the message when
the process dies between commit and publish), and the Django outbox libraries found
(django-outbox-pattern publishes over STOMP, not Celery; jaiminho polls a second table of
serialized calls) would add a table and polling latency where this rides on the workflows row
and a notification.
"""

import logging
import threading
import time
import uuid
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

from workflows import metrics, statements
from workflows.models import Status
from workflows.services.workflows import WORKFLOW_CHANNEL, workflows_publish

logger = logging.getLogger(__name__)

# Notifications taken in at most at once.
BATCH_SIZE = 500
# After the first notification, how long more arrive before the batch is published: at a few
# hundred acks a second this fills messages of WORKER_BATCH_SIZE ids instead of sending one per
# workflow, for at most this much delay.
LINGER_SECONDS = 0.05
# How often a follower tries to become the leader.
LEADER_RETRY_SECONDS = 5.0
# Longest wait between two attempts, to reconnect to PostgreSQL or to publish a refused batch.
_BACKOFF_MAX = 30.0
_LOCK = "workflows.dispatcher"


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
            row = conn.execute(statements.TRY_LEADER_LOCK, [_LOCK]).fetchone()
            if row and row[0]:
                return True
            self._stop.wait(LEADER_RETRY_SECONDS)
        return False

    def _next_batch(self, conn: Any) -> list[str]:
        """The workflow ids announced so far: waits up to poll_seconds for the first, then
        takes what arrives within LINGER_SECONDS more, up to BATCH_SIZE."""
        batch: list[str] = []
        timeout = self.poll_seconds
        until = None
        while len(batch) < BATCH_SIZE:
            before = len(batch)
            for notify in conn.notifies(timeout=timeout, stop_after=BATCH_SIZE - len(batch)):
                workflow_id = _workflow_id(notify.payload)
                if workflow_id is not None:
                    batch.append(workflow_id)
            if len(batch) == before and until is None:
                break
            if until is None:
                until = time.monotonic() + LINGER_SECONDS
            timeout = until - time.monotonic()
            if timeout <= 0:
                break
        return batch

    def _catch_up(self, conn: Any) -> None:
        """Publish the recent RECEIVED workflows: their notifications may have had no listener."""
        after: tuple[Any, Any] = ("-infinity", "00000000-0000-0000-0000-000000000000")
        total = 0
        while not self._stop.is_set():
            rows = conn.execute(
                statements.DISPATCHER_CATCH_UP,
                [
                    Status.RECEIVED.value,
                    settings.RECONCILE_STALE_AFTER_SECONDS,
                    *after,
                    BATCH_SIZE,
                ],
            ).fetchall()
            if not rows:
                break
            self._publish([str(row[0]) for row in rows])
            total += len(rows)
            after = (rows[-1][1], rows[-1][0])
        if total:
            logger.info("dispatcher: caught up with %d received workflows", total)

    def _publish(self, batch: list[str]) -> None:
        """Publish, retrying while the broker refuses: the notifications that arrive meanwhile
        wait in PostgreSQL's queue. Given up only when stopped (the next leader catches up)."""
        backoff = 0.5
        while not self._stop.is_set():
            sent = workflows_publish(workflow_ids=batch)
            self.published += sent
            metrics.dispatcher_published(sent)
            batch = batch[sent:]
            if not batch:
                return
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)


def _workflow_id(payload: str) -> str | None:
    """The workflow id an announcement carries; None (logged) for anything else sent on the
    channel, which no code of ours sends."""
    try:
        return str(uuid.UUID(payload))
    except ValueError:
        logger.warning("dispatcher: ignored a notification that is not a workflow id")
        return None
