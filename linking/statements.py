"""The linking app's hot-path SQL for a consumer's batch, each statement written out in full.

As in workflows/statements.py, a batch's rows travel as parallel arrays (`unnest`): one
statement, one round trip, whatever the batch's size; the services build the arrays. Those run
by workflows.statements.execute take them bound in binary (`%(name)b`); REQUESTS goes through
Customer.objects.raw, bound by Django.
"""

# The customer and the request data (still encrypted) of each workflow of a batch, in one
# query. The request data may be gone (purged): then the LEFT JOIN gives NULL.
REQUESTS = """
SELECT c.*, w.id AS batch_workflow_id, r.data AS request_data
  FROM workflows_workflow w
  JOIN merchant_customer c ON c.id = w.customer_id
  LEFT JOIN linking_linkrequest r ON r.request_id = w.request_id
 WHERE w.id = ANY(%(ids)s::uuid[])
"""

# The candidates of each search of a batch, ranked; a review's with how the customer's fields
# agree with each (linking.agreement, JSON text, NULL otherwise).
CANDIDATES = """
INSERT INTO linking_searchcandidate
       (workflow_id, attempt, rank, internal_patient_id, score, match_grade, agreement,
        created_at)
SELECT workflow_id, attempt, rank, internal_patient_id, score, match_grade, agreement::jsonb,
       created_at
  FROM unnest(
  %(workflow)b::uuid[], %(attempt)b::int[], %(rank)b::int[], %(internal)b::text[],
  %(score)b::float8[], %(grade)b::text[], %(agreement)b::text[], %(at)b::timestamptz[])
  AS v(workflow_id, attempt, rank, internal_patient_id, score, match_grade, agreement,
       created_at)
"""

# The mapping of each workflow that links, and its history line, in one statement. A patient
# linked already (by another workflow: only an operator's actions on old workflows can do
# that) keeps its one LINKED mapping (mapping_one_linked_per_patient) and gets nothing: the
# workflows that did link are returned. `relinked` when the patient was linked before and
# de-linked since: its history has a de-link (link_delink writes one with each). Read from the
# history, whose only index by customer is by patient: the mappings' listing index starts with
# the customer too, and with stale statistics the planner took it to read every mapping of the
# customer for each link (tests/test_query_scale.py).
LINK = """
WITH v AS (
  SELECT * FROM unnest(
    %(workflow)b::uuid[], %(customer)b::uuid[], %(patient)b::uuid[], %(internal)b::text[],
    %(score)b::float8[], %(grade)b::text[], %(reason)b::text[]
  ) AS v(workflow_id, customer_id, patient_id, internal_id, score, grade, reason)
), mapped AS (
  INSERT INTO linking_patientmapping
         (customer_id, customer_patient_id, internal_patient_id, status, workflow_id, score,
          match_grade, created_at, updated_at, delinked_at, delinked_by, delinked_reason)
  SELECT customer_id, patient_id, internal_id, 'LINKED', workflow_id, score, grade,
         %(now)s, %(now)s, NULL, '', ''
    FROM v
  ON CONFLICT (customer_id, customer_patient_id) WHERE status = 'LINKED' DO NOTHING
  RETURNING id, workflow_id, customer_id, customer_patient_id, internal_patient_id, score
), history AS (
  INSERT INTO linking_linkhistory
         (customer_id, customer_patient_id, event, mapping_id, workflow_id,
          internal_patient_id, score, actor, reason, at)
  SELECT m.customer_id, m.customer_patient_id,
         CASE WHEN EXISTS (
           SELECT 1 FROM linking_linkhistory h
            WHERE h.customer_id = m.customer_id AND h.customer_patient_id = m.customer_patient_id
              AND h.event = 'delinked') THEN 'relinked' ELSE 'linked' END,
         m.id, m.workflow_id, m.internal_patient_id, m.score, %(actor)s, v.reason, %(now)s
    FROM mapped m JOIN v ON v.workflow_id = m.workflow_id
)
SELECT workflow_id FROM mapped
"""

# Accept a link request: the request data, the workflow, its first timeline line and the
# idempotency record, in one statement (one round trip, one transaction), under the key's
# advisory lock, or nothing at all: when the key is known, the patient is linked or has a
# workflow pending (or a concurrent request wins a unique constraint). Each later row is
# inserted once per row of the one before. The workflow is announced to the dispatcher
# (pg_notify, delivered at commit) once per inserted record, so never for a request that
# inserted nothing (a volatile call in a subquery's output is always evaluated). Returns 1 or 0.
# Every column is written (tests/linking/test_ack_path.py checks them against the models).
ACCEPT = """
WITH request AS (
  INSERT INTO linking_linkrequest (request_id, customer_id, data, created_at)
  SELECT %(request)s::uuid, %(customer)s::uuid, %(data)s::text, %(now)s::timestamptz
   WHERE pg_try_advisory_xact_lock(hashtextextended(%(lock)s, 0))
     AND NOT EXISTS (SELECT 1 FROM linking_idempotencyrecord
                      WHERE customer_id = %(customer)s AND key = %(key)s)
     AND NOT EXISTS (SELECT 1 FROM linking_patientmapping
                      WHERE customer_id = %(customer)s AND customer_patient_id = %(patient)s
                        AND status = %(linked)s)
     AND NOT EXISTS (SELECT 1 FROM workflows_workflow
                      WHERE customer_id = %(customer)s AND patient_id = %(patient)s
                        AND status = ANY(%(pending)s::text[]))
  RETURNING 1
), workflow AS (
  INSERT INTO workflows_workflow
         (id, request_id, customer_id, patient_id, request_type, status, result, reason,
          attempts, requeues, claim_id, claimed_until, webhook_url, search_id, created_at,
          updated_at)
  SELECT %(workflow)s::uuid, %(request)s::uuid, %(customer)s::uuid, %(patient)s::uuid,
         %(request_type)s, %(received)s, NULL, '', 0, 0, NULL, NULL, %(webhook_url)s, NULL,
         %(now)s::timestamptz, %(now)s::timestamptz
    FROM request
  RETURNING 1
), timeline AS (
  INSERT INTO workflows_workflowtransition (workflow_id, source, target, reason, actor, at)
  SELECT %(workflow)s::uuid, '', %(received)s, 'accepted', 'api', %(now)s::timestamptz
    FROM workflow
  RETURNING 1
), record AS (
  INSERT INTO linking_idempotencyrecord
         (customer_id, key, fingerprint, workflow_id, response_status, response_body,
          response_headers, created_at, expires_at)
  SELECT %(customer)s::uuid, %(key)s, %(fingerprint)s, %(workflow)s::uuid, %(status)s,
         %(body)s, %(headers)s::jsonb, %(now)s::timestamptz, %(expires)s::timestamptz
    FROM workflow
  RETURNING 1
)
SELECT count(*) FROM (SELECT pg_notify(%(channel)s, %(message)s) FROM record) AS announced
"""

# Accept the items of a POST /link/batch at once: ACCEPT's rows for each item, in one statement.
# The items come distinct (no key or patient twice: the service sends the later ones through
# ACCEPT, after this, so they see these rows). An item is taken under its key's advisory lock
# unless its key is known, its patient linked or pending; the others insert nothing and go
# through ACCEPT one by one, which tells why. `fresh` is evaluated once (a CTE with a volatile
# call is materialized). Returns the workflows inserted, each announced to the dispatcher.
# `OFFSET 0` keeps each NOT EXISTS a lookup of its item in the index that fits (PostgreSQL does
# not turn such a subquery into a join): as joins, with statistics not yet analyzed after a
# burst of batches, the planner compared every item with every pending workflow of the
# customer (`make bench`: 15,000,000 comparisons, 0.9 s for 1,000 items; 13 ms as lookups).
ACCEPT_MANY = """
WITH fresh AS (
  SELECT * FROM unnest(
    %(request)b::uuid[], %(workflow)b::uuid[], %(patient)b::uuid[], %(key)b::text[],
    %(lock)b::text[], %(data)b::text[], %(webhook_url)b::text[], %(fingerprint)b::text[],
    %(body)b::text[], %(headers)b::text[]
  ) AS v(request_id, workflow_id, patient_id, key, lock, data, webhook_url, fingerprint, body,
         headers)
   WHERE pg_try_advisory_xact_lock(hashtextextended(v.lock, 0))
     AND NOT EXISTS (SELECT 1 FROM linking_idempotencyrecord
                      WHERE customer_id = %(customer)s AND key = v.key OFFSET 0)
     AND NOT EXISTS (SELECT 1 FROM linking_patientmapping
                      WHERE customer_id = %(customer)s AND customer_patient_id = v.patient_id
                        AND status = %(linked)s OFFSET 0)
     AND NOT EXISTS (SELECT 1 FROM workflows_workflow
                      WHERE customer_id = %(customer)s AND patient_id = v.patient_id
                        AND status = ANY(%(pending)s::text[]) OFFSET 0)
), request AS (
  INSERT INTO linking_linkrequest (request_id, customer_id, data, created_at)
  SELECT request_id, %(customer)s::uuid, data, %(now)s::timestamptz FROM fresh
), workflow AS (
  INSERT INTO workflows_workflow
         (id, request_id, customer_id, patient_id, request_type, status, result, reason,
          attempts, requeues, claim_id, claimed_until, webhook_url, search_id, created_at,
          updated_at)
  SELECT workflow_id, request_id, %(customer)s::uuid, patient_id, %(request_type)s,
         %(received)s, NULL, '', 0, 0, NULL, NULL, webhook_url, NULL, %(now)s::timestamptz,
         %(now)s::timestamptz
    FROM fresh
  RETURNING id
), timeline AS (
  INSERT INTO workflows_workflowtransition (workflow_id, source, target, reason, actor, at)
  SELECT id, '', %(received)s, 'accepted', 'api', %(now)s::timestamptz FROM workflow
), record AS (
  INSERT INTO linking_idempotencyrecord
         (customer_id, key, fingerprint, workflow_id, response_status, response_body,
          response_headers, created_at, expires_at)
  SELECT %(customer)s::uuid, key, fingerprint, workflow_id, %(status)s, body, headers::jsonb,
         %(now)s::timestamptz, %(expires)s::timestamptz
    FROM fresh
)
SELECT id, pg_notify(%(channel)s, id::text) FROM workflow
"""

# GET /link/status, the read customers poll: one row of the customer's own workflow (a foreign
# id reads nothing). Run on Django's cursor by linking.selectors.link_status_for_customer.
STATUS = """
SELECT id, status, result, reason, created_at, updated_at
  FROM workflows_workflow
 WHERE id = %s AND customer_id = %s
"""

# The (customer, Idempotency-Key) lock of an acceptance: transaction-scoped, never waited for.
TRY_XACT_LOCK = "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))"
