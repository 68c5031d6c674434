"""The invariants, checked over the database and what the webhook receiver got.

I1 every workflow that got a 202 is terminal (COMPLETED or FAILED) by the deadline, or waits in
   REVIEW for an operator when that is its expected outcome (and then nobody was told anything);
I2 exactly one terminal transition per workflow, and none after it;
I3 no customer patient has two LINKED mappings;
I4 every terminal workflow has a delivered webhook, or an explicitly exhausted delivery;
I5 one workflow per (customer, idempotency key).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from tests.chaos.load import Posted
from tests.chaos.stack import Stack

TERMINAL = ("COMPLETED", "FAILED")
REVIEW = "REVIEW"  # a resting state: the machine's part is done, a person decides


@dataclass
class Verdict:
    scenario: str
    workflows: int = 0
    lost: int = 0  # I1 (and I4: a terminal workflow the customer was never told about)
    duplicated: int = 0  # I2, I3, I5, and webhooks received twice where no crash excuses it
    unexpected: int = 0  # outcomes or answers the scenario forbids (5xx, slow acks, ...)
    max_time_to_terminal: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.unexpected == 0

    def note(self, text: str) -> None:
        if len(self.notes) < 12:
            self.notes.append(text)


def accepted_ids(posted: list[Posted]) -> list[str]:
    return sorted({p.workflow_id for p in posted if p.workflow_id})


def settled(workflow_id: str, status: str | None, review: frozenset[str]) -> bool:
    return status in TERMINAL or (status == REVIEW and workflow_id in review)


def wait_terminal(
    stack: Stack, ids: list[str], *, deadline: float, review: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Poll until every id is settled (terminal, or in REVIEW for the ids in `review`) or the
    deadline (monotonic) passes; id -> status."""
    statuses: dict[str, str] = {}
    while True:
        with stack.db() as conn:
            rows = conn.execute(
                "SELECT id::text, status FROM workflows_workflow WHERE id = ANY(%s::uuid[])",
                [ids],
            ).fetchall()
        statuses = {row[0]: row[1] for row in rows}
        pending = [i for i in ids if not settled(i, statuses.get(i), review)]
        if not pending or time.monotonic() > deadline:
            return statuses
        time.sleep(0.5)


def wait_webhooks(stack: Stack, ids: list[str], *, deadline: float) -> None:
    """Wait until every terminal workflow's delivery has settled (not PENDING)."""
    while time.monotonic() < deadline:
        with stack.db() as conn:
            (pending,) = conn.execute(
                "SELECT count(*) FROM workflows_webhookdelivery d"
                " WHERE d.workflow_id = ANY(%s::uuid[]) AND d.status = 'PENDING'",
                [ids],
            ).fetchone() or (0,)
        if pending == 0:
            return
        time.sleep(0.5)


def check(
    stack: Stack,
    scenario: str,
    posted: list[Posted],
    *,
    deadline_seconds: float,
    allow_failed: bool = False,
    allow_webhook_duplicates: bool = False,
    expected_results: bool = True,
) -> Verdict:
    """Wait for the deadline, then check I1-I5 and the scenario's expectations."""
    verdict = Verdict(scenario)
    ids = accepted_ids(posted)
    verdict.workflows = len(ids)
    deadline = time.monotonic() + deadline_seconds
    review = frozenset(
        p.workflow_id for p in posted if p.workflow_id and p.expected_result == REVIEW
    )
    statuses = wait_terminal(stack, ids, deadline=deadline, review=review)
    wait_webhooks(stack, ids, deadline=deadline)

    # I1
    not_terminal = [i for i in ids if not settled(i, statuses.get(i), review)]
    verdict.lost += len(not_terminal)
    for workflow_id in not_terminal[:3]:
        verdict.note(f"I1 not terminal: {workflow_id} ({statuses.get(workflow_id, 'missing')})")
    in_review = [i for i in ids if statuses.get(i) == REVIEW]

    with stack.db() as conn:
        # I2: one terminal transition, and nothing after it.
        for workflow_id, count in conn.execute(
            "SELECT workflow_id::text, count(*) FROM workflows_workflowtransition"
            " WHERE target IN ('COMPLETED', 'FAILED') AND workflow_id = ANY(%s::uuid[])"
            " GROUP BY 1 HAVING count(*) > 1",
            [ids],
        ).fetchall():
            verdict.duplicated += 1
            verdict.note(f"I2 {count} terminal transitions: {workflow_id}")
        for (workflow_id,) in conn.execute(
            "SELECT DISTINCT t.workflow_id::text FROM workflows_workflowtransition t"
            " JOIN workflows_workflowtransition e ON e.workflow_id = t.workflow_id"
            "  AND e.target IN ('COMPLETED', 'FAILED')"
            " WHERE t.id > e.id AND t.workflow_id = ANY(%s::uuid[])",
            [ids],
        ).fetchall():
            verdict.duplicated += 1
            verdict.note(f"I2 transition after the end: {workflow_id}")
        # I3
        for row in conn.execute(
            "SELECT customer_patient_id::text, count(*) FROM linking_patientmapping"
            " WHERE status = 'LINKED' GROUP BY customer_id, customer_patient_id"
            " HAVING count(*) > 1"
        ).fetchall():
            verdict.duplicated += 1
            verdict.note(f"I3 two LINKED mappings: {row[0]}")
        # I5
        for row in conn.execute(
            "SELECT key, count(*) FROM linking_idempotencyrecord GROUP BY customer_id, key"
            " HAVING count(*) > 1"
        ).fetchall():
            verdict.duplicated += 1
            verdict.note(f"I5 two records for key {row[0]}")
        keys_to_ids: dict[str, set[str]] = {}
        for p in posted:
            if p.workflow_id:
                keys_to_ids.setdefault(p.key, set()).add(p.workflow_id)
        for key, workflow_ids in keys_to_ids.items():
            if len(workflow_ids) > 1:
                verdict.duplicated += 1
                verdict.note(f"I5 key {key} answered with {len(workflow_ids)} workflows")
        # I4: terminal -> delivered (seen by the receiver, signature valid) or explicitly ended.
        deliveries = {
            row[0]: (row[1], row[2])
            for row in conn.execute(
                "SELECT workflow_id::text, status, webhook_id FROM workflows_webhookdelivery"
                " WHERE workflow_id = ANY(%s::uuid[])",
                [ids],
            ).fetchall()
        }
        # A review is not an ending: no terminal transition, and the customer is not told yet.
        for workflow_id in in_review:
            if workflow_id in deliveries:
                verdict.unexpected += 1
                verdict.note(f"webhook sent while in review: {workflow_id}")
        rows = conn.execute(
            "SELECT w.id::text, w.status, w.result, w.reason,"
            " extract(epoch FROM (t.at - w.created_at))"
            " FROM workflows_workflow w JOIN workflows_workflowtransition t"
            "  ON t.workflow_id = w.id AND t.target IN ('COMPLETED', 'FAILED')"
            " WHERE w.id = ANY(%s::uuid[])",
            [ids],
        ).fetchall()
    received = Counter(
        d.headers.get("webhook-id") for d in stack.receiver.deliveries() if 200 <= d.answered < 300
    )
    bad_signatures = [d for d in stack.receiver.deliveries() if d.verified is False]
    if bad_signatures:
        verdict.unexpected += len(bad_signatures)
        verdict.note(f"{len(bad_signatures)} webhooks with a bad signature")
    aborted = stack.receiver.aborted()
    if aborted:
        # A sender killed mid-body: no delivery (the receiver answered 400), so the delivery
        # row stays due and is sent again whole.
        verdict.note(f"{len(aborted)} webhooks cut short by a kill (aborted, sent again)")
    if stack.restarts:
        verdict.note(f"supervisor restarted {stack.restarts}")
    expected = {p.workflow_id: p.expected_result for p in posted if p.workflow_id}
    for workflow_id, status, result, reason, seconds in rows:
        verdict.max_time_to_terminal = max(verdict.max_time_to_terminal, float(seconds))
        delivery = deliveries.get(workflow_id)
        if delivery is None:
            verdict.lost += 1
            verdict.note(f"I4 no delivery row: {workflow_id}")
        elif delivery[0] == "DELIVERED":
            if received[delivery[1]] == 0:
                verdict.lost += 1
                verdict.note(f"I4 DELIVERED but never received: {workflow_id}")
            elif received[delivery[1]] > 1 and not allow_webhook_duplicates:
                verdict.duplicated += 1
                verdict.note(f"webhook received {received[delivery[1]]}x: {workflow_id}")
        elif delivery[0] not in ("EXHAUSTED", "DISABLED"):
            verdict.lost += 1
            verdict.note(f"I4 delivery still {delivery[0]}: {workflow_id}")
        if status == "FAILED" and not allow_failed:
            verdict.unexpected += 1
            verdict.note(f"FAILED ({reason}): {workflow_id}")
        if status == "COMPLETED" and expected_results and result != expected.get(workflow_id):
            verdict.unexpected += 1
            verdict.note(f"result {result}, expected {expected.get(workflow_id)}: {workflow_id}")
    return verdict


def answers(posted: list[Posted]) -> Counter[int]:
    return Counter(p.status for p in posted)
