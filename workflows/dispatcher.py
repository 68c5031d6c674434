"""The dispatcher: runs the scheduler (workflows/scheduler.py) on one process of the deployment.

The outbox. The ack path only writes to PostgreSQL: its single statement inserts the workflow,
due at once, and calls pg_notify, which PostgreSQL delivers when, and only if, the transaction
commits. The dispatcher LISTENs on that channel: a notification (or a second without one) runs a
tick of the scheduler, which decides what to publish. The web process never publishes, and a
stalled broker costs the ack nothing.

Every Celery worker runs one (config/celery.py) and `manage.py dispatch` runs one on its own; a
session advisory lock makes exactly one of them the leader, so the schedule has one author. When
the leader dies its connection closes, the lock is released, and another takes over within
LEADER_RETRY_SECONDS; nothing is lost meanwhile: the due work waits in PostgreSQL.

Hand-written: Celery has no outbox (`transaction.on_commit` + `delay()` loses the message when
the process dies between commit and publish), and the Django outbox libraries found
(django-outbox-pattern publishes over STOMP, not Celery; jaiminho polls a second table of
serialized calls) would add a table and polling latency where this rides on the workflows row
and a notification.
"""

import logging
import threading
import time
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections

from workflows import metrics, statements
from workflows.scheduler import schedule_tick
from workflows.services.workflows import WORKFLOW_CHANNEL

logger = logging.getLogger(__name__)

# Notifications taken in at most at once (the rest wait in PostgreSQL's queue for the next).
BATCH_SIZE = 500
# After the first notification, how long more arrive before the tick runs: at a few hundred
# acks a second this fills messages of WORKER_BATCH_SIZE ids instead of sending one per
# workflow, for at most this much delay.
LINGER_SECONDS = 0.05
# While the bound on work in flight holds due work back, how often the tick runs again (room
# is made by endings, which send no notification).
FULL_POLL_SECONDS = 0.1
# How often a follower tries to become the leader.
LEADER_RETRY_SECONDS = 5.0
# Longest wait between two attempts to reconnect to PostgreSQL.
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
            wait = 0.0
            while not self._stop.is_set():
                self._wait(conn, wait)
                tick = schedule_tick(conn)
                self.published += len(tick.published)
                wait = FULL_POLL_SECONDS if tick.full else self.poll_seconds
        finally:
            wrapper.close()

    def _lead(self, conn: Any) -> bool:
        while not self._stop.is_set():
            row = conn.execute(statements.TRY_LEADER_LOCK, [_LOCK]).fetchone()
            if row and row[0]:
                return True
            self._stop.wait(LEADER_RETRY_SECONDS)
        return False

    def _wait(self, conn: Any, timeout: float) -> None:
        """Until a workflow is announced (and LINGER_SECONDS more, for the ones right behind
        it) or `timeout` passes. The announcements' payloads are not needed: the tick reads
        what is due. (psycopg's notifies() returns only at its timeout or its `stop_after`:
        the first announcement is awaited alone, then the linger takes the rest.)"""
        if timeout <= 0:
            return
        if not any(True for _ in conn.notifies(timeout=timeout, stop_after=1)):
            return
        until = time.monotonic() + LINGER_SECONDS
        taken = 1
        while taken < BATCH_SIZE and (left := until - time.monotonic()) > 0:
            taken += sum(1 for _ in conn.notifies(timeout=left, stop_after=BATCH_SIZE - taken))
