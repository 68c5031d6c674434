"""The workflows app's hot-path SQL, each statement written out in full.

A batch of workflows is one statement per step whatever its size: every row's values travel as
parallel arrays (`unnest`), so the text of each statement is fixed and visible here, and
psycopg sends one round trip for the whole batch. The services build the arrays; the state
machine (workflows.models.Workflow) decides every value first. A `{model}` in a statement is
that model's table, from its `_meta` (rendered at import; tests/snapshots/statements.sql holds
the rendered text, so a review's diff shows the SQL that runs).
"""

from typing import Any

import psycopg
from django.db import connection, models
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from workflows.models import Status, WebhookAttempt, WebhookDelivery, Workflow, WorkflowTransition


def with_tables(text: str, *tables: type[models.Model]) -> str:
    """`text` with each `{model}` (a model's lower-case name) replaced by its table's name."""
    return text.format_map({str(model._meta.model_name): model._meta.db_table for model in tables})


def _sql(text: str) -> str:
    return with_tables(text, WebhookAttempt, WebhookDelivery, Workflow, WorkflowTransition)


# States a consumer may pick up: RECEIVED to start, REQUESTED to poll an asynchronous search
# that sent no callback, the others to resume after a crash. Never REVIEW: that is a person's.
CLAIMABLE_STATES = (
    Status.RECEIVED,
    Status.IN_PROGRESS,
    Status.REQUESTED,
    Status.LINKED,
    Status.NO_RESULTS,
)

# Claim a batch in one statement (so one round trip, and its own transaction): of the named
# workflows, lock those free for this consumer (rows another transaction holds are skipped, not
# waited for: a concurrent consumer or the sweep has them), take the claim, count the attempt,
# start the RECEIVED ones and record that. A duplicate id in the batch is one row.
# `renew` pairs ids with our own earlier claim (a retry of the same work).
CLAIM = _sql("""
WITH renew AS (
  SELECT * FROM unnest(%(renew_ids)s::uuid[], %(renew_claims)s::uuid[]) AS r(id, claim_id)
), target AS (
  SELECT w.id, w.status FROM {workflow} w
   WHERE w.id = ANY(%(ids)s::uuid[])
     AND w.status = ANY(%(claimable)s::text[])
     AND (w.claimed_until IS NULL OR w.claimed_until <= %(now)s
          OR w.claim_id IN (SELECT r.claim_id FROM renew r WHERE r.id = w.id))
   FOR UPDATE SKIP LOCKED
), claimed AS (
  UPDATE {workflow} AS w
     SET claim_id = coalesce((SELECT r.claim_id FROM renew r WHERE r.id = w.id),
                             gen_random_uuid()),
         claimed_until = %(until)s, attempts = w.attempts + 1,
         status = CASE WHEN target.status = %(source)s THEN %(target)s ELSE target.status END,
         updated_at = %(now)s
    FROM target
   WHERE w.id = target.id
  RETURNING w.*, target.status AS claimed_from
), started AS (
  INSERT INTO {workflowtransition} (workflow_id, source, target, reason, actor, at)
  SELECT id, %(source)s, %(target)s, '', %(actor)s, %(now)s FROM claimed
   WHERE claimed_from = %(source)s
)
SELECT * FROM claimed
""")

# Keep these claims alive until each one's `until` (the heartbeat of workflows/claims.py, and a
# retry held for its backoff), only where the claim is still the one named. A row locked right
# now (its consumer is ending it, a callback or the sweep has it) is skipped, not waited for:
# the next beat renews it, well inside the lease. Returns (id, true) per claim renewed and
# (id, false) per claim that is no longer the one named (taken over, handed back, released).
RENEW = _sql("""
WITH v AS (
  SELECT * FROM unnest(%(ids)b::uuid[], %(claims)b::uuid[], %(until)b::timestamptz[])
    AS v(id, claim_id, until)
), mine AS (
  SELECT w.id, v.until FROM {workflow} w JOIN v ON w.id = v.id AND w.claim_id = v.claim_id
     FOR UPDATE OF w SKIP LOCKED
), renewed AS (
  UPDATE {workflow} AS w SET claimed_until = mine.until
    FROM mine
   WHERE w.id = mine.id
  RETURNING w.id
)
SELECT id, true FROM renewed
UNION ALL
SELECT v.id, false FROM v
 WHERE NOT EXISTS (SELECT 1 FROM {workflow} w WHERE w.id = v.id AND w.claim_id = v.claim_id)
""")

# Hand these claims back (a worker shutting down, its searches unfinished): free at once, the
# attempt not counted, a line in the timeline; only where the claim is still the one named.
HAND_BACK = _sql("""
WITH v AS (
  SELECT * FROM unnest(%(ids)b::uuid[], %(claims)b::uuid[]) AS v(id, claim_id)
), mine AS (
  SELECT w.id FROM {workflow} w JOIN v ON w.id = v.id AND w.claim_id = v.claim_id
   WHERE w.status = ANY(%(claimable)b::text[])
   ORDER BY w.id FOR UPDATE OF w
), released AS (
  UPDATE {workflow} AS w
     SET claim_id = NULL, claimed_until = %(now)b, attempts = greatest(w.attempts - 1, 0)
    FROM mine
   WHERE w.id = mine.id
  RETURNING w.id, w.status
), lines AS (
  INSERT INTO {workflowtransition} (workflow_id, source, target, reason, actor, at)
  SELECT id, status, status, %(reason)b, %(actor)b, %(now)b FROM released
)
SELECT id FROM released
""")

# The rows of a batch as they are now, locked for the ending's transaction (in id order, so
# two transactions locking overlapping batches cannot deadlock).
LOCK = _sql("""
SELECT id, status, claim_id FROM {workflow}
 WHERE id = ANY(%(ids)b::uuid[]) ORDER BY id FOR UPDATE
""")

# Save a batch of workflows as the state machine left them, each only while it still has the
# status it was loaded with (ConcurrentTransitionMixin's guard); record each one's timeline
# lines in their order; insert the webhook delivery of each ending, tied to its terminal line.
# Returns ('w', workflow id, NULL) per saved workflow and ('d', workflow id, delivery id).
SAVE = _sql("""
WITH v AS (
  SELECT * FROM unnest(
    %(id)b::uuid[], %(loaded)b::text[], %(status)b::text[], %(result)b::text[],
    %(reason)b::text[], %(search_id)b::text[], %(attempts)b::int[], %(requeues)b::int[],
    %(claim_id)b::uuid[], %(claimed_until)b::timestamptz[], %(deadline_at)b::timestamptz[],
    %(updated_at)b::timestamptz[]
  ) AS v(id, loaded, status, result, reason, search_id, attempts, requeues, claim_id,
         claimed_until, deadline_at, updated_at)
), saved AS (
  UPDATE {workflow} AS w
     SET status = v.status, result = v.result, reason = v.reason, search_id = v.search_id,
         attempts = v.attempts, requeues = v.requeues, claim_id = v.claim_id,
         claimed_until = v.claimed_until, deadline_at = v.deadline_at, updated_at = v.updated_at
    FROM v
   WHERE w.id = v.id AND w.status = v.loaded
  RETURNING w.id
), lines AS (
  INSERT INTO {workflowtransition} (workflow_id, source, target, reason, actor, at)
  SELECT l.workflow_id, l.source, l.target, l.reason, l.actor, l.at
    FROM unnest(
      %(line_workflow)b::uuid[], %(line_source)b::text[], %(line_target)b::text[],
      %(line_reason)b::text[], %(line_actor)b::text[], %(line_at)b::timestamptz[]
    ) WITH ORDINALITY AS l(workflow_id, source, target, reason, actor, at, n)
    JOIN saved ON saved.id = l.workflow_id
   ORDER BY l.n
  RETURNING id, workflow_id, target
), deliveries AS (
  INSERT INTO {webhookdelivery} (
    webhook_id, workflow_id, transition_id, customer_id, event_type, url, payload, status,
    attempts, next_attempt_at, last_status_code, last_error, created_at, updated_at,
    delivered_at)
  SELECT d.webhook_id, d.workflow_id, lines.id, d.customer_id, d.event_type, d.url, d.payload,
         'PENDING', 0, d.at, NULL, '', d.at, d.at, NULL
    FROM unnest(
      %(delivery_workflow)b::uuid[], %(delivery_target)b::text[], %(delivery_webhook_id)b::text[],
      %(delivery_customer)b::uuid[], %(delivery_event)b::text[], %(delivery_url)b::text[],
      %(delivery_payload)b::text[], %(delivery_at)b::timestamptz[]
    ) AS d(workflow_id, target, webhook_id, customer_id, event_type, url, payload, at)
    JOIN lines ON lines.workflow_id = d.workflow_id AND lines.target = d.target
  RETURNING id, workflow_id
)
SELECT 'w', id, NULL FROM saved
UNION ALL
SELECT 'd', workflow_id, id FROM deliveries
""")

# Take the due deliveries among these for one sending attempt each: of two workers handed the
# same delivery, only one gets it. Not due for anyone else until the lease ends (a crashed
# sender's delivery is due again then).
DELIVERIES_CLAIM = _sql("""
UPDATE {webhookdelivery}
   SET next_attempt_at = %(lease)s, attempts = attempts + 1, updated_at = %(now)s
 WHERE id = ANY(%(ids)b::bigint[]) AND status = 'PENDING' AND next_attempt_at <= %(now)s
RETURNING id, attempts
""")

# Each attempt's log line and its delivery's new state, for a batch of attempts.
DELIVERIES_SETTLE = _sql("""
WITH v AS (
  SELECT * FROM unnest(
    %(id)b::bigint[], %(at)b::timestamptz[], %(code)b::int[], %(latency_ms)b::int[],
    %(error)b::text[], %(status)b::text[], %(next_attempt_at)b::timestamptz[],
    %(delivered_at)b::timestamptz[]
  ) AS v(id, at, code, latency_ms, error, status, next_attempt_at, delivered_at)
), logged AS (
  INSERT INTO {webhookattempt} (delivery_id, at, status_code, latency_ms, error)
  SELECT id, at, code, latency_ms, error FROM v
)
UPDATE {webhookdelivery} AS d
   SET status = v.status, next_attempt_at = v.next_attempt_at, last_status_code = v.code,
       last_error = v.error, updated_at = v.at, delivered_at = v.delivered_at
  FROM v
 WHERE d.id = v.id
""")


# The dispatcher's lead: a session lock, held for as long as its connection lives.
TRY_LEADER_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"

# A new leader's catch-up: the RECEIVED workflows younger than the sweep's threshold, in
# (updated_at, id) order from a cursor, a page at a time (their notifications may have had no
# listener). Positional: the dispatcher runs it on its own psycopg connection.
DISPATCHER_CATCH_UP = _sql("""
SELECT id, updated_at FROM {workflow}
 WHERE status = %s AND updated_at > now() - make_interval(secs => %s)
   AND (updated_at, id) > (%s, %s)
 ORDER BY updated_at, id
 LIMIT %s
""")


def execute(sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Run one statement on Django's connection, in its transaction; its rows (none for a
    statement without).

    The arrays (`%(name)b`) are sent bound and in binary: Django's cursor binds on the client,
    writing every array out as a quoted literal in Python, which cost ~2 ms of CPU for 15 arrays
    of 50 against ~0.3 ms bound in binary (and 12% of the workers' samples). Django's own
    cursor wrapper is kept around it: its error classes, its query log and execute_wrapper.
    """
    connection.ensure_connection()
    connection.validate_thread_sharing()
    with connection.wrap_database_errors:
        raw = psycopg.Cursor(connection.connection)
    wrapper = CursorDebugWrapper if connection.queries_logged else CursorWrapper
    wrapped = wrapper(raw, connection)
    with wrapped as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []
