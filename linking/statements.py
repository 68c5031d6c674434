"""The linking app's hot-path SQL, each statement written out in full, and the typed functions
that run the ones the services read rows of.

As in workflows/statements.py, a batch's rows travel as parallel arrays (`unnest`): one
statement, one round trip, whatever the batch's size; the services build the arrays. Those run
by workflows.statements.execute take them bound in binary (`%(name)b`); REQUESTS goes through
Customer.objects.raw, bound by Django. A `{model}` in a statement is that model's table, from
its `_meta` (rendered at import; tests/snapshots/statements.sql holds the rendered text).
"""

import datetime as dt
import uuid
from typing import Any, NamedTuple

from django.db import connection

from linking.models import (
    IdempotencyRecord,
    LinkHistory,
    LinkRequest,
    PatientMapping,
    SearchCandidate,
)
from merchant.models import Customer
from workflows.models import Workflow, WorkflowTransition
from workflows.statements import execute, with_tables

_MODELS = (
    Customer,
    IdempotencyRecord,
    LinkHistory,
    LinkRequest,
    PatientMapping,
    SearchCandidate,
    Workflow,
    WorkflowTransition,
)


def _sql(text: str) -> str:
    return with_tables(text, *_MODELS)


# The customer and the request data (still encrypted) of each workflow of a batch, in one
# query. The request data may be gone (purged): then the LEFT JOIN gives NULL.
REQUESTS = _sql("""
SELECT c.*, w.id AS batch_workflow_id, r.data AS request_data
  FROM {workflow} w
  JOIN {customer} c ON c.id = w.customer_id
  LEFT JOIN {linkrequest} r ON r.request_id = w.request_id
 WHERE w.id = ANY(%(ids)s::uuid[])
""")

# The candidates of each search of a batch, ranked; a review's with how the customer's fields
# agree with each (linking.agreement, JSON text, NULL otherwise).
CANDIDATES = _sql("""
INSERT INTO {searchcandidate}
       (workflow_id, attempt, rank, internal_patient_id, score, match_grade, agreement,
        created_at)
SELECT workflow_id, attempt, rank, internal_patient_id, score, match_grade, agreement::jsonb,
       created_at
  FROM unnest(
  %(workflow)b::uuid[], %(attempt)b::int[], %(rank)b::int[], %(internal)b::text[],
  %(score)b::float8[], %(grade)b::text[], %(agreement)b::text[], %(at)b::timestamptz[])
  AS v(workflow_id, attempt, rank, internal_patient_id, score, match_grade, agreement,
       created_at)
""")

# The mapping of each workflow that links, and its history line, in one statement. A patient
# linked already (by another workflow: only an operator's actions on old workflows can do
# that) keeps its one LINKED mapping (mapping_one_linked_per_patient) and gets nothing: the
# workflows that did link are returned. `relinked` when the patient was linked before and
# de-linked since: its history has a de-link (link_delink writes one with each). Read from the
# history, whose only index by customer is by patient: the mappings' listing index starts with
# the customer too, and with stale statistics the planner took it to read every mapping of the
# customer for each link (tests/test_query_scale.py).
LINK = _sql("""
WITH v AS (
  SELECT * FROM unnest(
    %(workflow)b::uuid[], %(customer)b::uuid[], %(patient)b::uuid[], %(internal)b::text[],
    %(score)b::float8[], %(grade)b::text[], %(reason)b::text[]
  ) AS v(workflow_id, customer_id, patient_id, internal_id, score, grade, reason)
), mapped AS (
  INSERT INTO {patientmapping}
         (customer_id, customer_patient_id, internal_patient_id, status, workflow_id, score,
          match_grade, created_at, updated_at, delinked_at, delinked_by, delinked_reason)
  SELECT customer_id, patient_id, internal_id, 'LINKED', workflow_id, score, grade,
         %(now)s, %(now)s, NULL, '', ''
    FROM v
  ON CONFLICT (customer_id, customer_patient_id) WHERE status = 'LINKED' DO NOTHING
  RETURNING id, workflow_id, customer_id, customer_patient_id, internal_patient_id, score
), history AS (
  INSERT INTO {linkhistory}
         (customer_id, customer_patient_id, event, mapping_id, workflow_id,
          internal_patient_id, score, actor, reason, at)
  SELECT m.customer_id, m.customer_patient_id,
         CASE WHEN EXISTS (
           SELECT 1 FROM {linkhistory} h
            WHERE h.customer_id = m.customer_id AND h.customer_patient_id = m.customer_patient_id
              AND h.event = 'delinked') THEN 'relinked' ELSE 'linked' END,
         m.id, m.workflow_id, m.internal_patient_id, m.score, %(actor)s, v.reason, %(now)s
    FROM mapped m JOIN v ON v.workflow_id = m.workflow_id
)
SELECT workflow_id FROM mapped
""")

# Accept link requests, one or many (POST /link sends one, POST /link/batch its distinct items):
# for each item its request data, its workflow, the workflow's first timeline line and the
# idempotency record, all in one statement (one round trip, one transaction), or nothing, and a
# row per item, in order, that says which: `accepted`, or why not. The rules live here only: an
# item is taken under its key's advisory lock (`locked` false: a request with the same key is
# being accepted right now) unless its key is known (the record's first answer, to replay or
# refuse, or to forget when expired), its patient linked (`linked_by`) or pending
# (`pending_id`). The reads use the statement's snapshot: a concurrent request that committed
# since then makes a unique constraint refuse the insert (IntegrityError), and the statement,
# run again, sees its rows. Each taken workflow is announced to the dispatcher (pg_notify,
# delivered at commit). The lookups are scalar subqueries (the record a whole row), so each
# stays a lookup of its item in the index that fits: as joins, with statistics not yet analyzed
# after a burst of batches, the planner compared every item with every pending workflow of the
# customer (`make bench`: 15,000,000 comparisons, 0.9 s for 1,000 items; 13 ms as lookups).
# Every column is written (tests/linking/test_ack_path.py checks them against the models).
ACCEPT = _sql("""
WITH item AS (
  SELECT v.*, pg_try_advisory_xact_lock(hashtextextended(v.lock, 0)) AS locked,
         (SELECT r FROM {idempotencyrecord} r
           WHERE r.customer_id = %(customer)s AND r.key = v.key) AS known,
         (SELECT m.workflow_id FROM {patientmapping} m
           WHERE m.customer_id = %(customer)s AND m.customer_patient_id = v.patient_id
             AND m.status = %(linked)s) AS linked_by,
         (SELECT w.id FROM {workflow} w
           WHERE w.customer_id = %(customer)s AND w.patient_id = v.patient_id
             AND w.status = ANY(%(pending)b::text[])) AS pending_id
    FROM unnest(
    %(request)b::uuid[], %(workflow)b::uuid[], %(patient)b::uuid[], %(key)b::text[],
    %(lock)b::text[], %(data)b::text[], %(webhook_url)b::text[], %(fingerprint)b::text[],
    %(body)b::text[], %(headers)b::text[]
    ) WITH ORDINALITY AS v(request_id, workflow_id, patient_id, key, lock, data, webhook_url,
                           fingerprint, body, headers, n)
), fresh AS (
  SELECT * FROM item
   WHERE locked AND (known).id IS NULL AND linked_by IS NULL AND pending_id IS NULL
), request AS (
  INSERT INTO {linkrequest} (request_id, customer_id, data, created_at)
  SELECT request_id, %(customer)s::uuid, data, %(now)s::timestamptz FROM fresh
), workflow AS (
  INSERT INTO {workflow}
         (id, request_id, customer_id, patient_id, request_type, status, result, reason,
          attempts, requeues, claim_id, claimed_until, deadline_at, due_at, published_at,
          webhook_url, search_id, created_at, updated_at)
  SELECT workflow_id, request_id, %(customer)s::uuid, patient_id, %(request_type)s,
         %(received)s, NULL, '', 0, 0, NULL, NULL, %(deadline)s::timestamptz,
         %(now)s::timestamptz, NULL, webhook_url, NULL, %(now)s::timestamptz, %(now)s::timestamptz
    FROM fresh
  RETURNING id
), timeline AS (
  INSERT INTO {workflowtransition} (workflow_id, source, target, reason, actor, at)
  SELECT id, '', %(received)s, 'accepted', 'api', %(now)s::timestamptz FROM workflow
), record AS (
  INSERT INTO {idempotencyrecord}
         (customer_id, key, fingerprint, workflow_id, response_status, response_body,
          response_headers, created_at, expires_at)
  SELECT %(customer)s::uuid, key, fingerprint, workflow_id, %(status)s, body, headers::jsonb,
         %(now)s::timestamptz, %(expires)s::timestamptz
    FROM fresh
), announced AS (
  SELECT id, pg_notify(%(channel)s, id::text) FROM workflow
)
SELECT item.workflow_id, announced.id IS NOT NULL AS accepted, item.locked, item.linked_by,
       item.pending_id, (known).fingerprint, (known).expires_at, (known).response_status,
       (known).response_body, (known).response_headers::text
  FROM item LEFT JOIN announced ON announced.id = item.workflow_id
 ORDER BY item.n
""")

# GET /link/status, the read customers poll: one row of the customer's own workflow (a foreign
# id reads nothing). Run on Django's cursor by linking.selectors.link_status_for_customer.
STATUS = _sql("""
SELECT id, status, result, reason, created_at, updated_at
  FROM {workflow}
 WHERE id = %s AND customer_id = %s
""")

# The (customer, Idempotency-Key) lock of an acceptance: transaction-scoped, never waited for.
TRY_XACT_LOCK = "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))"


class Acceptance(NamedTuple):
    """ACCEPT's row for one item: its workflow id (new, or not used), and what happened."""

    workflow_id: uuid.UUID
    accepted: bool
    locked: bool
    linked_by: uuid.UUID | None
    pending_id: uuid.UUID | None
    # The idempotency record its key already had, if any.
    known_fingerprint: str | None
    known_expires_at: dt.datetime | None
    known_status: int | None
    known_body: str | None
    known_headers: str | None


def accept(params: dict[str, Any]) -> list[Acceptance]:
    """Run ACCEPT in the caller's transaction (autocommit: its own); a row per item, in order."""
    return [Acceptance(*row) for row in execute(ACCEPT, params)]


def try_xact_lock(name: str) -> bool:
    """TRY_XACT_LOCK: True when this transaction now holds the lock `name`."""
    with connection.cursor() as cursor:
        cursor.execute(TRY_XACT_LOCK, [name])
        row = cursor.fetchone()
    return bool(row and row[0])


def status_row(*, workflow_id: uuid.UUID, customer_id: uuid.UUID) -> tuple[Any, ...] | None:
    """STATUS: (id, status, result, reason, created_at, updated_at), or None."""
    with connection.cursor() as cursor:
        cursor.execute(STATUS, [workflow_id, customer_id])
        row: tuple[Any, ...] | None = cursor.fetchone()
    return row
