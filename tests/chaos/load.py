"""The load: concurrent POST /link requests, each answer recorded with its timing."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from tests.chaos.stack import Stack

# Demographics the stand-in answers deterministically (standin/README.md), with the outcome
# the service must reach for them when nothing is wrong.
KINDS: dict[str, tuple[dict[str, Any], str]] = {
    "certain": (
        {
            "full_name": "Jane Q Doe",
            "dob": "1980-04-02",
            "contact": {"phone": "+1-555-0100", "email": "jane@example.org"},
        },
        "LINKED",
    ),
    "none": ({"full_name": "Zed Nobody", "dob": "1901-01-01"}, "NO_RESULTS"),
    # Two `certain` candidates: never guessed, it waits for an operator in REVIEW.
    "ambiguous": ({"full_name": "Alex Rivera", "dob": "1975-09-14"}, "REVIEW"),
}
MIX = ["certain", "certain", "none", "ambiguous"]


@dataclass
class Posted:
    key: str
    kind: str
    status: int  # 0: no HTTP answer
    elapsed: float
    answered_at: float
    workflow_id: str | None = None
    replayed: bool = False
    error: str = ""
    body: dict[str, Any] | None = None  # what was sent, for a retry with the same key

    @property
    def expected_result(self) -> str:
        return KINDS[self.kind][1]


def link_body(kind: str, patient_id: str | None = None) -> dict[str, Any]:
    demographics, _ = KINDS[kind]
    return {"patient": {"id": patient_id or str(uuid.uuid4()), **demographics}}


_local = threading.local()


def _session() -> requests.Session:
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        _local.session = session
    return session


def post_link(
    stack: Stack,
    body: dict[str, Any],
    key: str,
    kind: str,
    *,
    timeout: float = 10,
    token: str | None = None,
) -> Posted:
    """POST /link as the stack's first customer, or as the customer whose `token` it is."""
    started = time.monotonic()
    try:
        response = _session().post(
            f"{stack.base_url}/link",
            json=body,
            timeout=timeout,
            headers={"customer-token": token or stack.token, "Idempotency-Key": key},
        )
    except requests.RequestException as exc:
        return Posted(
            key,
            kind,
            0,
            time.monotonic() - started,
            time.time(),
            error=type(exc).__name__,
            body=body,
        )
    elapsed = time.monotonic() - started
    workflow_id = None
    if response.status_code == 202:
        workflow_id = response.json()["workflow-id"]
    return Posted(
        key,
        kind,
        response.status_code,
        elapsed,
        time.time(),
        workflow_id,
        replayed=response.headers.get("Idempotent-Replayed") == "true",
        body=body,
    )


def post_many(
    stack: Stack,
    count: int,
    *,
    concurrency: int = 8,
    kinds: list[str] | None = None,
    pause: float = 0.0,
) -> list[Posted]:
    """`count` distinct link requests (a new patient and key each), `concurrency` at a time."""
    mix = kinds or MIX

    def one(index: int) -> Posted:
        kind = mix[index % len(mix)]
        if pause:
            time.sleep(pause)
        return post_link(stack, link_body(kind), f"chaos-{uuid.uuid4()}", kind)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, range(count)))


def post_at_rate(
    stack: Stack,
    *,
    rate: float,
    seconds: float,
    tokens: list[str] | None = None,
    kinds: list[str] | None = None,
    concurrency: int = 16,
) -> list[Posted]:
    """POST /link `rate` times a second for `seconds`, on a fixed timetable (a slow answer
    does not delay the next request), the customers' `tokens` in turn; every answer."""
    mix = kinds or MIX
    who = tokens or [stack.token]
    count = round(rate * seconds)
    started = time.monotonic()

    def one(index: int) -> Posted:
        time.sleep(max(0.0, started + index / rate - time.monotonic()))
        kind = mix[index % len(mix)]
        return post_link(
            stack, link_body(kind), f"chaos-{uuid.uuid4()}", kind, token=who[index % len(who)]
        )

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, range(count)))


def post_batch(
    stack: Stack, kinds: list[str], *, token: str | None = None, timeout: float = 120
) -> list[Posted]:
    """One POST /link/batch of len(kinds) items (a new patient and key each): one Posted per
    item, with the batch's answer (status, time) and the item's workflow id when accepted."""
    items = [(kind, link_body(kind), f"chaos-{uuid.uuid4()}") for kind in kinds]
    started = time.monotonic()
    try:
        response = _session().post(
            f"{stack.base_url}/link/batch",
            json={"requests": [{**body, "idempotency-key": key} for _, body, key in items]},
            timeout=timeout,
            headers={
                "customer-token": token or stack.token,
                "Idempotency-Key": f"chaos-batch-{uuid.uuid4()}",
            },
        )
    except requests.RequestException as exc:
        elapsed = time.monotonic() - started
        return [
            Posted(key, kind, 0, elapsed, time.time(), error=type(exc).__name__, body=body)
            for kind, body, key in items
        ]
    elapsed = time.monotonic() - started
    answered = response.json().get("items", []) if response.status_code == 202 else []
    by_index = {item["index"]: item for item in answered}
    posted = []
    for index, (kind, body, key) in enumerate(items):
        item = by_index.get(index, {})
        workflow_id = item.get("workflow-id")
        # An item refused inside an accepted batch: its own problem's status.
        status = response.status_code
        if status == 202 and not workflow_id:
            status = int(item.get("problem", {}).get("status", 0))
        posted.append(Posted(key, kind, status, elapsed, time.time(), workflow_id, body=body))
    return posted
