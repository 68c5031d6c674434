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

from merchant.models import Customer
from workflows.models import Status, WebhookAttempt, WebhookDelivery, Workflow, WorkflowTransition


def with_tables(text: str, *tables: type[models.Model]) -> str:
    """`text` with each `{model}` (a model's lower-case name) replaced by its table's name."""
    return text.format_map({str(model._meta.model_name): model._meta.db_table for model in tables})


def _sql(text: str) -> str:
    return with_tables(
        text, Customer, WebhookAttempt, WebhookDelivery, Workflow, WorkflowTransition
    )


# States a consumer may pick up: RECEIVED to start, REQUESTED to poll an asynchronous search
# that sent no callback, the others to resume after a crash. Never REVIEW: that is a person's.
CLAIMABLE_STATES = (
    Status.RECEIVED,
    Status.IN_PROGRESS,
    Status.REQUESTED,
    Status.LINKED,
    Status.NO_RESULTS,
)
# The same, as the text values the statements take (`%(claimable)s::text[]`).
CLAIMABLE_VALUES = [str(state) for state in CLAIMABLE_STATES]

# Claim a batch in one statement (so one round trip, and its own transaction): of the named
# workflows, lock those free for this consumer (rows another transaction holds are skipped, not
# waited for: a concurrent consumer or the sweep has them), take the claim, count the attempt,
# start the RECEIVED ones and record that. A duplicate id in the batch is one row. Not free:
# claimed by a live claim, or waiting for a later due time (a retry's backoff: a stray or
# duplicate message must not run it early). A claimed workflow is in flight (published_at).
CLAIM = _sql("""
WITH target AS (
  SELECT w.id, w.status FROM {workflow} w
   WHERE w.id = ANY(%(ids)s::uuid[])
     AND w.status = ANY(%(claimable)s::text[])
     AND (w.claimed_until IS NULL OR w.claimed_until <= %(now)s)
     AND (w.due_at IS NULL OR w.due_at <= %(now)s)
   FOR UPDATE SKIP LOCKED
), claimed AS (
  UPDATE {workflow} AS w
     SET claim_id = gen_random_uuid(), claimed_until = %(until)s, attempts = w.attempts + 1,
         status = CASE WHEN target.status = %(source)s THEN %(target)s ELSE target.status END,
         due_at = NULL, published_at = coalesce(w.published_at, %(now)s), updated_at = %(now)s
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

# Put these claimed workflows back on the schedule, due again at each one's `due_at`: a retry
# after its backoff, work the internal system's outage stopped, or a worker shutting down. The
# claim is dropped, the workflow leaves the work in flight, `refund` takes back the attempt its
# claim counted, and the timeline says why; only where the claim is still the one named.
PUT_BACK = _sql("""
WITH v AS (
  SELECT * FROM unnest(%(ids)b::uuid[], %(claims)b::uuid[], %(due_at)b::timestamptz[],
                       %(refund)b::boolean[], %(reason)b::text[])
    AS v(id, claim_id, due_at, refund, reason)
), mine AS (
  SELECT w.id, v.due_at, v.refund, v.reason FROM {workflow} w
    JOIN v ON w.id = v.id AND w.claim_id = v.claim_id
   WHERE w.status = ANY(%(claimable)b::text[])
   ORDER BY w.id FOR UPDATE OF w
), put AS (
  UPDATE {workflow} AS w
     SET claim_id = NULL, claimed_until = NULL, published_at = NULL, due_at = mine.due_at,
         attempts = CASE WHEN mine.refund THEN greatest(w.attempts - 1, 0) ELSE w.attempts END,
         updated_at = %(now)b
    FROM mine
   WHERE w.id = mine.id
  RETURNING w.id, w.status, mine.reason
), lines AS (
  INSERT INTO {workflowtransition} (workflow_id, source, target, reason, actor, at)
  SELECT id, status, status, reason, %(actor)b, %(now)b FROM put
)
SELECT id FROM put
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
    %(due_at)b::timestamptz[], %(published_at)b::timestamptz[], %(updated_at)b::timestamptz[]
  ) AS v(id, loaded, status, result, reason, search_id, attempts, requeues, claim_id,
         claimed_until, deadline_at, due_at, published_at, updated_at)
), saved AS (
  UPDATE {workflow} AS w
     SET status = v.status, result = v.result, reason = v.reason, search_id = v.search_id,
         attempts = v.attempts, requeues = v.requeues, claim_id = v.claim_id,
         claimed_until = v.claimed_until, deadline_at = v.deadline_at, due_at = v.due_at,
         published_at = v.published_at, updated_at = v.updated_at
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

# The scheduler's publication (workflows/scheduler.py): of the workflows due by `now`, take as
# many as the work in flight leaves room for under `bound`, in rounds across customers (each
# customer's due work oldest first; round k holds each customer's k-th `weight` rows; rounds in
# order, and within a round the oldest due first), and mark them in flight. Rows another
# transaction holds are skipped (an operator ending one, a consumer). One statement, its own
# transaction: the messages are published after it commits. Returns (id, room) per workflow
# published, in the order picked (the order of the messages), or one (NULL, room) when none was.
SCHEDULE = _sql("""
WITH flight AS (
  SELECT count(*) AS n FROM {workflow} WHERE published_at IS NOT NULL
), room AS (
  SELECT greatest(%(bound)s - flight.n, 0) AS n FROM flight
), heads AS (
  SELECT d.id, d.due_at, c.weight,
         row_number() OVER (PARTITION BY c.id ORDER BY d.due_at, d.id) AS rank
    FROM {customer} c
   CROSS JOIN LATERAL (
     SELECT w.id, w.due_at FROM {workflow} w
      WHERE w.customer_id = c.id AND w.due_at <= %(now)s
        AND w.status = ANY(%(claimable)s::text[])
      ORDER BY w.due_at, w.id
      LIMIT (SELECT n FROM room)
      FOR UPDATE OF w SKIP LOCKED
   ) d
), picked AS (
  SELECT id, row_number() OVER (ORDER BY (rank - 1) / weight, due_at, id) AS pos FROM heads
   ORDER BY pos
   LIMIT (SELECT n FROM room)
), published AS (
  UPDATE {workflow} AS w SET published_at = %(now)s, due_at = NULL
    FROM picked
   WHERE w.id = picked.id AND w.due_at IS NOT NULL
  RETURNING w.id
)
SELECT x.id, room.n FROM room
  LEFT JOIN (SELECT picked.id, picked.pos FROM published JOIN picked ON picked.id = published.id) x
    ON true
 ORDER BY x.pos
""")

# The scheduler's tally for /metrics and the dashboard: due now, due later, in flight, and the
# oldest due time.
SCHEDULE_COUNTS = _sql("""
SELECT count(*) FILTER (WHERE due_at <= %(now)s),
       count(*) FILTER (WHERE due_at > %(now)s),
       (SELECT count(*) FROM {workflow} WHERE published_at IS NOT NULL),
       min(due_at)
  FROM {workflow} WHERE due_at IS NOT NULL AND status = ANY(%(claimable)s::text[])
""")

# The customers with the most work due now, most first: (name, count).
SCHEDULE_TOP_CUSTOMERS = _sql("""
SELECT c.name, d.due FROM (
  SELECT customer_id, count(*) AS due FROM {workflow}
   WHERE due_at <= %(now)s AND status = ANY(%(claimable)s::text[])
   GROUP BY customer_id ORDER BY due DESC, customer_id LIMIT %(limit)s
) d JOIN {customer} c ON c.id = d.customer_id
 ORDER BY d.due DESC, c.name
""")

# Is any work published and not claimed for `stale` seconds? (Then the scheduler asks the broker
# whether its messages still wait.)
UNTAKEN = _sql("""
SELECT EXISTS (
  SELECT 1 FROM {workflow}
   WHERE published_at < %(now)s - make_interval(secs => %(stale)s) AND claim_id IS NULL
)
""")

# Published work nobody claimed, due again at once: what a failed publication did not send, or
# what a worker shutting down received and did not claim.
UNPUBLISH = _sql("""
UPDATE {workflow} SET published_at = NULL, due_at = %(now)s
 WHERE id = ANY(%(ids)s::uuid[]) AND published_at IS NOT NULL AND claim_id IS NULL
""")

# Work in flight that nobody is doing, due again at once: claimed, but the claim's lease ended
# (its worker stopped renewing it: it died, or lost PostgreSQL); or, with `take_unclaimed`,
# published and never claimed for `stale` seconds (the scheduler sets it only when the broker's
# queue is empty: the message was lost, a broker restarted without persistence; messages that
# only wait behind slow or stopped workers are not lost). The dead claim is dropped; the
# timeline says which; each counts as a re-queue.
RECOVER = _sql("""
WITH lost AS (
  SELECT id, CASE WHEN claim_id IS NULL THEN 'not taken' ELSE 'lease ended' END AS why
    FROM {workflow}
   WHERE published_at IS NOT NULL
     AND (claimed_until < %(now)s
          OR (%(take_unclaimed)s AND claim_id IS NULL
              AND published_at < %(now)s - make_interval(secs => %(stale)s)))
   ORDER BY published_at LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED
), recovered AS (
  UPDATE {workflow} AS w
     SET claim_id = NULL, claimed_until = NULL, published_at = NULL, due_at = %(now)s,
         requeues = w.requeues + 1, updated_at = %(now)s
    FROM lost
   WHERE w.id = lost.id
  RETURNING w.id, w.status, lost.why
), lines AS (
  INSERT INTO {workflowtransition} (workflow_id, source, target, reason, actor, at)
  SELECT id, status, status,
         CASE WHEN why = 'lease ended' THEN %(lease_reason)s ELSE %(lost_reason)s END,
         %(actor)s, %(now)s
    FROM recovered
)
SELECT id, why FROM recovered
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
