"""`make demo-review`: a customer that decides its own reviews (issue 19), through a running
`make run` stack, shown step by step.

Onboards a demo customer with `--review-by customer`, posts the stand-in's ambiguous patient
(standin/README.md, "Example demographics": two `certain` Alex Riveras born the same day, which
the policy never links by itself), and follows it: RECEIVED -> IN_PROGRESS -> REVIEW, the verified
`link.review_required` webhook, the candidates in the status, the customer's decision for the
best one, then the verified `link.completed` and COMPLETED/LINKED. The onboarding, the receiver
and the polling are `make demo`'s (standin/demo.py).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

import requests

from standin.demo import API, TERMINAL, DemoFailed, demo_main, follow, status_of, wait_webhook
from standin.receiver import Delivery, ReceiverServer

# The phone is the one only the second Alex Rivera of the stand-in has (0.98 against 0.97):
# still two `certain` candidates, so still a REVIEW, but the agreement then tells them apart and
# the best candidate is the one the customer's own data points to.
PATIENT = {"full_name": "Alex Rivera", "dob": "1975-09-14", "contact": {"phone": "+1-555-0141"}}
SECONDS_PER_STEP = 60
# docs/api.md's order of the agreement's fields (the stored document keeps its own key order).
FIELDS = ("family", "given", "birth-date", "phone", "email", "address")


def main() -> int:
    # echo off: the webhooks are printed by `run` in their place in the story, not as they come.
    return demo_main(
        run, label="demo-review", customer="Demo review", review_by="customer", echo=False
    )


def show(delivery: Delivery) -> dict[str, Any]:
    """Print a verified delivery as type and data (wait_webhook checked the signature)."""
    payload: dict[str, Any] = delivery.json()
    print(
        f"webhook {delivery.headers.get('webhook-id')} (verified): {payload['type']} "
        f"{json.dumps(payload['data'])}"
    )
    return payload


def run(token: str, receiver: ReceiverServer) -> int:
    patient = {"id": str(uuid.uuid4()), **PATIENT}
    print(f"POST /link {json.dumps({'patient': patient})}")
    response = requests.post(
        f"{API}/link",
        json={"patient": patient},
        headers={"customer-token": token, "Idempotency-Key": f"demo-review-{uuid.uuid4()}"},
        timeout=10,
    )
    print(f"  -> {response.status_code} {response.text}")
    if response.status_code != 202:
        raise DemoFailed(f"POST /link answered {response.status_code}")
    workflow_id: str = response.json()["workflow-id"]
    seen: list[str] = [response.json()["status"]]

    # 1. The search ends in REVIEW; a customer-reviewed customer is told so by webhook.
    deadline = time.monotonic() + SECONDS_PER_STEP
    status = follow(token, workflow_id, seen, until={"REVIEW", *TERMINAL}, deadline=deadline)
    if status.get("status") != "REVIEW":
        raise DemoFailed(f"workflow is {status.get('status')} ({status.get('result')}), not REVIEW")
    data = show(wait_webhook(receiver, workflow_id, "link.review_required", deadline=deadline))[
        "data"
    ]
    expected = {
        "workflow-id": workflow_id,
        "status": "REVIEW",
        "customer-patient-id": patient["id"],
    }
    if {key: data.get(key) for key in expected} != expected:
        raise DemoFailed(f"link.review_required data {data}, expected {expected}")

    # 2. What the customer may see to decide: opaque candidate ids, scores, grades, and for
    # each field it sent whether the candidate's record agrees (never the record itself).
    status = status_of(token, workflow_id)
    print(f"GET /link/status/{workflow_id} -> {json.dumps(status)}")
    candidates: list[dict[str, Any]] = status.get("candidates") or []
    if not candidates:
        raise DemoFailed("the status in REVIEW lists no candidates")
    for rank, candidate in enumerate(candidates, 1):
        agreement: dict[str, bool] = candidate["agreement"]
        named = sorted(agreement, key=lambda f: FIELDS.index(f) if f in FIELDS else len(FIELDS))
        agreed = [field for field in named if agreement[field]]
        differ = [field for field in named if not agreement[field]]
        print(
            f"  candidate {rank}: {candidate['candidate-id']} score {candidate['score']:.2f} "
            f"{candidate['grade']}; agreed: {', '.join(agreed) or 'nothing'}"
            + (f"; disagreed: {', '.join(differ)}" if differ else "")
        )
    # Best first already; max() keeps the first of equal scores, so this is candidates[0] unless
    # the order ever changes.
    best = max(candidates, key=lambda candidate: float(candidate["score"]))

    # 3. The customer's decision: link the best candidate.
    decision = {"candidate-id": best["candidate-id"]}
    answer = requests.post(
        f"{API}/link/{workflow_id}/decision",
        json=decision,
        headers={"customer-token": token},
        timeout=10,
    )
    print(f"POST /link/{workflow_id}/decision {json.dumps(decision)}")
    print(f"  -> {answer.status_code} {answer.text}")
    if answer.status_code != 200:
        raise DemoFailed(f"the decision answered {answer.status_code}")

    # 4. It completes, and the customer is told by `link.completed`.
    deadline = time.monotonic() + SECONDS_PER_STEP
    completed = show(wait_webhook(receiver, workflow_id, "link.completed", deadline=deadline))
    status = follow(token, workflow_id, seen, deadline=deadline)
    print("path: " + " -> ".join(seen))
    final = (status.get("status"), status.get("result"), completed["data"].get("result"))
    if final != ("COMPLETED", "LINKED", "LINKED"):
        raise DemoFailed(f"ended {final[0]} ({final[1]}), webhook result {final[2]}, not LINKED")
    print("demo-review succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
