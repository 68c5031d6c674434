-- linking.statements.ACCEPT
WITH item AS (
  SELECT v.*, pg_try_advisory_xact_lock(hashtextextended(v.lock, 0)) AS locked,
         (SELECT r FROM linking_idempotencyrecord r
           WHERE r.customer_id = %(customer)s AND r.key = v.key) AS known,
         (SELECT m.workflow_id FROM linking_patientmapping m
           WHERE m.customer_id = %(customer)s AND m.customer_patient_id = v.patient_id
             AND m.status = %(linked)s) AS linked_by,
         (SELECT w.id FROM workflows_workflow w
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
  INSERT INTO linking_linkrequest (request_id, customer_id, data, created_at)
  SELECT request_id, %(customer)s::uuid, data, %(now)s::timestamptz FROM fresh
), workflow AS (
  INSERT INTO workflows_workflow
         (id, request_id, customer_id, patient_id, request_type, status, result, reason,
          attempts, requeues, claim_id, claimed_until, deadline_at, due_at, published_at,
          webhook_url, search_id, created_at, updated_at)
  SELECT workflow_id, request_id, %(customer)s::uuid, patient_id, %(request_type)s,
         %(received)s, NULL, '', 0, 0, NULL, NULL, %(deadline)s::timestamptz,
         %(now)s::timestamptz, NULL, webhook_url, NULL, %(now)s::timestamptz, %(now)s::timestamptz
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
), announced AS (
  SELECT id, pg_notify(%(channel)s, id::text) FROM workflow
)
SELECT item.workflow_id, announced.id IS NOT NULL AS accepted, item.locked, item.linked_by,
       item.pending_id, (known).fingerprint, (known).expires_at, (known).response_status,
       (known).response_body, (known).response_headers::text
  FROM item LEFT JOIN announced ON announced.id = item.workflow_id
 ORDER BY item.n

-- linking.statements.CANDIDATES
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

-- linking.statements.LINK
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

-- linking.statements.REQUESTS
SELECT c.*, w.id AS batch_workflow_id, r.data AS request_data
  FROM workflows_workflow w
  JOIN merchant_customer c ON c.id = w.customer_id
  LEFT JOIN linking_linkrequest r ON r.request_id = w.request_id
 WHERE w.id = ANY(%(ids)s::uuid[])

-- linking.statements.STATUS
SELECT id, status, result, reason, created_at, updated_at
  FROM workflows_workflow
 WHERE id = %s AND customer_id = %s

-- linking.statements.TRY_XACT_LOCK
SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))

-- workflows.statements.CLAIM
WITH target AS (
  SELECT w.id, w.status FROM workflows_workflow w
   WHERE w.id = ANY(%(ids)s::uuid[])
     AND w.status = ANY(%(claimable)s::text[])
     AND (w.claimed_until IS NULL OR w.claimed_until <= %(now)s)
     AND (w.due_at IS NULL OR w.due_at <= %(now)s)
   FOR UPDATE SKIP LOCKED
), claimed AS (
  UPDATE workflows_workflow AS w
     SET claim_id = gen_random_uuid(), claimed_until = %(until)s, attempts = w.attempts + 1,
         status = CASE WHEN target.status = %(source)s THEN %(target)s ELSE target.status END,
         due_at = NULL, published_at = coalesce(w.published_at, %(now)s), updated_at = %(now)s
    FROM target
   WHERE w.id = target.id
  RETURNING w.*, target.status AS claimed_from
), started AS (
  INSERT INTO workflows_workflowtransition (workflow_id, source, target, reason, actor, at)
  SELECT id, %(source)s, %(target)s, '', %(actor)s, %(now)s FROM claimed
   WHERE claimed_from = %(source)s
)
SELECT * FROM claimed

-- workflows.statements.DELIVERIES_CLAIM
UPDATE workflows_webhookdelivery
   SET next_attempt_at = %(lease)s, attempts = attempts + 1, updated_at = %(now)s
 WHERE id = ANY(%(ids)b::bigint[]) AND status = 'PENDING' AND next_attempt_at <= %(now)s
RETURNING id, attempts

-- workflows.statements.DELIVERIES_SETTLE
WITH v AS (
  SELECT * FROM unnest(
    %(id)b::bigint[], %(at)b::timestamptz[], %(code)b::int[], %(latency_ms)b::int[],
    %(error)b::text[], %(status)b::text[], %(next_attempt_at)b::timestamptz[],
    %(delivered_at)b::timestamptz[]
  ) AS v(id, at, code, latency_ms, error, status, next_attempt_at, delivered_at)
), logged AS (
  INSERT INTO workflows_webhookattempt (delivery_id, at, status_code, latency_ms, error)
  SELECT id, at, code, latency_ms, error FROM v
)
UPDATE workflows_webhookdelivery AS d
   SET status = v.status, next_attempt_at = v.next_attempt_at, last_status_code = v.code,
       last_error = v.error, updated_at = v.at, delivered_at = v.delivered_at
  FROM v
 WHERE d.id = v.id

-- workflows.statements.LOCK
SELECT id, status, claim_id FROM workflows_workflow
 WHERE id = ANY(%(ids)b::uuid[]) ORDER BY id FOR UPDATE

-- workflows.statements.PUT_BACK
WITH v AS (
  SELECT * FROM unnest(%(ids)b::uuid[], %(claims)b::uuid[], %(due_at)b::timestamptz[],
                       %(refund)b::boolean[], %(reason)b::text[])
    AS v(id, claim_id, due_at, refund, reason)
), mine AS (
  SELECT w.id, v.due_at, v.refund, v.reason FROM workflows_workflow w
    JOIN v ON w.id = v.id AND w.claim_id = v.claim_id
   WHERE w.status = ANY(%(claimable)b::text[])
   ORDER BY w.id FOR UPDATE OF w
), put AS (
  UPDATE workflows_workflow AS w
     SET claim_id = NULL, claimed_until = NULL, published_at = NULL, due_at = mine.due_at,
         attempts = CASE WHEN mine.refund THEN greatest(w.attempts - 1, 0) ELSE w.attempts END,
         updated_at = %(now)b
    FROM mine
   WHERE w.id = mine.id
  RETURNING w.id, w.status, mine.reason
), lines AS (
  INSERT INTO workflows_workflowtransition (workflow_id, source, target, reason, actor, at)
  SELECT id, status, status, reason, %(actor)b, %(now)b FROM put
)
SELECT id FROM put

-- workflows.statements.RECOVER
WITH lost AS (
  SELECT id, CASE WHEN claim_id IS NULL THEN 'not taken' ELSE 'lease ended' END AS why
    FROM workflows_workflow
   WHERE published_at IS NOT NULL
     AND (claimed_until < %(now)s
          OR (%(take_unclaimed)s AND claim_id IS NULL
              AND published_at < %(now)s - make_interval(secs => %(stale)s)))
   ORDER BY published_at LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED
), recovered AS (
  UPDATE workflows_workflow AS w
     SET claim_id = NULL, claimed_until = NULL, published_at = NULL, due_at = %(now)s,
         requeues = w.requeues + 1, updated_at = %(now)s
    FROM lost
   WHERE w.id = lost.id
  RETURNING w.id, w.status, lost.why
), lines AS (
  INSERT INTO workflows_workflowtransition (workflow_id, source, target, reason, actor, at)
  SELECT id, status, status,
         CASE WHEN why = 'lease ended' THEN %(lease_reason)s ELSE %(lost_reason)s END,
         %(actor)s, %(now)s
    FROM recovered
)
SELECT id, why FROM recovered

-- workflows.statements.RENEW
WITH v AS (
  SELECT * FROM unnest(%(ids)b::uuid[], %(claims)b::uuid[], %(until)b::timestamptz[])
    AS v(id, claim_id, until)
), mine AS (
  SELECT w.id, v.until FROM workflows_workflow w JOIN v ON w.id = v.id AND w.claim_id = v.claim_id
     FOR UPDATE OF w SKIP LOCKED
), renewed AS (
  UPDATE workflows_workflow AS w SET claimed_until = mine.until
    FROM mine
   WHERE w.id = mine.id
  RETURNING w.id
)
SELECT id, true FROM renewed
UNION ALL
SELECT v.id, false FROM v
 WHERE NOT EXISTS (SELECT 1 FROM workflows_workflow w WHERE w.id = v.id AND w.claim_id = v.claim_id)

-- workflows.statements.SAVE
WITH v AS (
  SELECT * FROM unnest(
    %(id)b::uuid[], %(loaded)b::text[], %(status)b::text[], %(result)b::text[],
    %(reason)b::text[], %(search_id)b::text[], %(attempts)b::int[], %(requeues)b::int[],
    %(claim_id)b::uuid[], %(claimed_until)b::timestamptz[], %(deadline_at)b::timestamptz[],
    %(due_at)b::timestamptz[], %(published_at)b::timestamptz[], %(updated_at)b::timestamptz[]
  ) AS v(id, loaded, status, result, reason, search_id, attempts, requeues, claim_id,
         claimed_until, deadline_at, due_at, published_at, updated_at)
), saved AS (
  UPDATE workflows_workflow AS w
     SET status = v.status, result = v.result, reason = v.reason, search_id = v.search_id,
         attempts = v.attempts, requeues = v.requeues, claim_id = v.claim_id,
         claimed_until = v.claimed_until, deadline_at = v.deadline_at, due_at = v.due_at,
         published_at = v.published_at, updated_at = v.updated_at
    FROM v
   WHERE w.id = v.id AND w.status = v.loaded
  RETURNING w.id
), lines AS (
  INSERT INTO workflows_workflowtransition (workflow_id, source, target, reason, actor, at)
  SELECT l.workflow_id, l.source, l.target, l.reason, l.actor, l.at
    FROM unnest(
      %(line_workflow)b::uuid[], %(line_source)b::text[], %(line_target)b::text[],
      %(line_reason)b::text[], %(line_actor)b::text[], %(line_at)b::timestamptz[]
    ) WITH ORDINALITY AS l(workflow_id, source, target, reason, actor, at, n)
    JOIN saved ON saved.id = l.workflow_id
   ORDER BY l.n
  RETURNING id, workflow_id, target
), deliveries AS (
  INSERT INTO workflows_webhookdelivery (
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

-- workflows.statements.SCHEDULE
WITH flight AS (
  SELECT count(*) AS n FROM workflows_workflow WHERE published_at IS NOT NULL
), room AS (
  SELECT greatest(%(bound)s - flight.n, 0) AS n FROM flight
), heads AS (
  SELECT d.id, d.due_at, c.weight,
         row_number() OVER (PARTITION BY c.id ORDER BY d.due_at, d.id) AS rank
    FROM merchant_customer c
   CROSS JOIN LATERAL (
     SELECT w.id, w.due_at FROM workflows_workflow w
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
  UPDATE workflows_workflow AS w SET published_at = %(now)s, due_at = NULL
    FROM picked
   WHERE w.id = picked.id AND w.due_at IS NOT NULL
  RETURNING w.id
)
SELECT x.id, room.n FROM room
  LEFT JOIN (SELECT picked.id, picked.pos FROM published JOIN picked ON picked.id = published.id) x
    ON true
 ORDER BY x.pos

-- workflows.statements.SCHEDULE_COUNTS
SELECT count(*) FILTER (WHERE due_at <= %(now)s),
       count(*) FILTER (WHERE due_at > %(now)s),
       (SELECT count(*) FROM workflows_workflow WHERE published_at IS NOT NULL),
       min(due_at)
  FROM workflows_workflow WHERE due_at IS NOT NULL AND status = ANY(%(claimable)s::text[])

-- workflows.statements.SCHEDULE_TOP_CUSTOMERS
SELECT c.name, d.due FROM (
  SELECT customer_id, count(*) AS due FROM workflows_workflow
   WHERE due_at <= %(now)s AND status = ANY(%(claimable)s::text[])
   GROUP BY customer_id ORDER BY due DESC, customer_id LIMIT %(limit)s
) d JOIN merchant_customer c ON c.id = d.customer_id
 ORDER BY d.due DESC, c.name

-- workflows.statements.TRY_LEADER_LOCK
SELECT pg_try_advisory_lock(hashtextextended(%s, 0))

-- workflows.statements.UNPUBLISH
UPDATE workflows_workflow SET published_at = NULL, due_at = %(now)s
 WHERE id = ANY(%(ids)s::uuid[]) AND published_at IS NOT NULL AND claim_id IS NULL

-- workflows.statements.UNTAKEN
SELECT EXISTS (
  SELECT 1 FROM workflows_workflow
   WHERE published_at < %(now)s - make_interval(secs => %(stale)s) AND claim_id IS NULL
)
