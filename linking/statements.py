"""The linking app's hot-path SQL for a consumer's batch, each statement written out in full.

As in workflows/statements.py, a batch's rows travel as parallel arrays (`unnest`): one
statement, one round trip, whatever the batch's size; the services build the arrays.
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

# The candidates of each search of a batch, ranked.
CANDIDATES = """
INSERT INTO linking_searchcandidate
       (workflow_id, attempt, rank, internal_patient_id, score, match_grade, created_at)
SELECT * FROM unnest(
  %(workflow)s::uuid[], %(attempt)s::int[], %(rank)s::int[], %(internal)s::text[],
  %(score)s::float8[], %(grade)s::text[], %(at)s::timestamptz[])
"""

# The mapping of each workflow that links, and its history line, in one statement. A patient
# linked already (by another workflow: only an operator's actions on old workflows can do
# that) keeps its one LINKED mapping (mapping_one_linked_per_patient) and gets nothing: the
# workflows that did link are returned. `relinked` when the patient was linked before and
# de-linked since.
LINK = """
WITH v AS (
  SELECT * FROM unnest(
    %(workflow)s::uuid[], %(customer)s::uuid[], %(patient)s::uuid[], %(internal)s::text[],
    %(score)s::float8[], %(grade)s::text[], %(reason)s::text[]
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
           SELECT 1 FROM linking_patientmapping p
            WHERE p.customer_id = m.customer_id AND p.customer_patient_id = m.customer_patient_id
              AND p.status = 'DE-LINKED') THEN 'relinked' ELSE 'linked' END,
         m.id, m.workflow_id, m.internal_patient_id, m.score, %(actor)s, v.reason, %(now)s
    FROM mapped m JOIN v ON v.workflow_id = m.workflow_id
)
SELECT workflow_id FROM mapped
"""
