"""`make demo`: one link request through a running `make run` stack, shown step by step.

Onboards a demo customer (with the same management command ops use), runs a webhook receiver
that verifies each delivery's signature, posts a link request, and prints the status as it moves
RECEIVED -> ... -> COMPLETED, then the verified webhook. `make demo-review` (standin/demo_review.py)
shares the parts below to show a customer review instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any

import requests

from standin.receiver import Delivery, ReceiverServer, make_receiver

API = os.environ.get("DEMO_API_URL", "http://127.0.0.1:8000")
RECEIVER_PORT = int(os.environ.get("DEMO_RECEIVER_PORT", "9000"))
TERMINAL = {"COMPLETED", "FAILED"}


class DemoFailed(Exception):
    """Why a demo stopped, in one line (printed as `<demo> FAILED: <reason>`, exit status 1)."""


def onboard(
    webhook_url: str, *, name: str = "Demo", review_by: str | None = None
) -> dict[str, str]:
    review = ["--review-by", review_by] if review_by else []
    try:
        output = subprocess.run(  # noqa: S603 -- our own manage.py, fixed arguments
            [
                sys.executable,
                "manage.py",
                "onboard_customer",
                "--name",
                f"{name} {time.strftime('%H:%M:%S')}",
                "--webhook-url",
                webhook_url,
                *review,
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except subprocess.CalledProcessError as exc:
        lines = (exc.stderr or "").strip().splitlines() or [f"exit status {exc.returncode}"]
        raise DemoFailed(f"onboard_customer: {lines[-1]}") from exc
    credentials: dict[str, str] = json.loads(output)
    return credentials


def service_up(*, timeout: float) -> bool:
    """Wait a little for a `make run` that is still starting (migrations, workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(f"{API}/problems/not-found", timeout=3)
            return True
        except requests.RequestException:
            time.sleep(0.5)
    return False


def demo_main(
    play: Callable[[str, ReceiverServer], int],
    *,
    label: str = "demo",
    customer: str = "Demo",
    review_by: str | None = None,
    echo: bool = True,
) -> int:
    """Onboard a customer whose webhooks go to a verifying receiver on RECEIVER_PORT, then
    `play(token, receiver)`; a DemoFailed, or the service or the receiver's port failing,
    ends it with one line."""
    if not service_up(timeout=30):
        print(f"No service at {API}: start it with `make run` in another terminal.")
        return 1
    try:
        receiver = make_receiver(port=RECEIVER_PORT, echo=echo)
    except OSError as exc:
        print(f"{label} FAILED: webhook receiver on port {RECEIVER_PORT}: {exc.strerror or exc}")
        return 1
    threading.Thread(target=receiver.serve_forever, args=(0.1,), daemon=True).start()
    try:
        credentials = onboard(f"{receiver.url}/webhooks", name=customer, review_by=review_by)
        receiver.state.secret = credentials["webhook_secret"]
        print(
            f"onboarded customer {credentials['customer_id']}"
            + (f" (--review-by {review_by})" if review_by else "")
        )
        return play(credentials["token"], receiver)
    except DemoFailed as exc:
        print(f"{label} FAILED: {exc}")
        return 1
    except requests.RequestException as exc:
        print(f"{label} FAILED: {API}: {exc.__class__.__name__}")
        return 1
    finally:
        receiver.shutdown()
        receiver.server_close()


def status_of(token: str, workflow_id: str) -> dict[str, Any]:
    """GET /link/status/<workflow-id>, the document."""
    response = requests.get(
        f"{API}/link/status/{workflow_id}", headers={"customer-token": token}, timeout=10
    )
    if response.status_code != 200:
        raise DemoFailed(f"GET /link/status/{workflow_id} answered {response.status_code}")
    document: dict[str, Any] = response.json()
    return document


def follow(
    token: str,
    workflow_id: str,
    seen: list[str],
    *,
    until: Collection[str] = TERMINAL,
    deadline: float,
) -> dict[str, Any]:
    """Poll the status until it is one of `until` or the deadline passes; print and append to
    `seen` each status it moves to. The last status document read."""
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = status_of(token, workflow_id)
        if seen[-1] != status["status"]:
            seen.append(status["status"])
            print(f"status: {status['status']} (result: {status['result']})")
        if status["status"] in until:
            break
        time.sleep(0.05)
    return status


def wait_webhook(
    receiver: ReceiverServer, workflow_id: str, event_type: str, *, deadline: float
) -> Delivery:
    """The first delivery of `event_type` for the workflow, its signature verified."""
    while time.monotonic() < deadline:
        for delivery in receiver.deliveries():
            payload = delivery.json()
            if (
                payload.get("type") == event_type
                and payload.get("data", {}).get("workflow-id") == workflow_id
            ):
                if not delivery.verified:
                    raise DemoFailed(
                        f"{event_type} webhook {delivery.headers.get('webhook-id')} did not verify"
                    )
                return delivery
        time.sleep(0.1)
    raise DemoFailed(f"no {event_type} webhook for {workflow_id} in time")


def main() -> int:
    return demo_main(run)


def run(token: str, receiver: ReceiverServer) -> int:
    headers = {"customer-token": token, "Idempotency-Key": f"demo-{uuid.uuid4()}"}
    body = {
        "patient": {
            "id": str(uuid.uuid4()),
            "full_name": "Jane Q Doe",
            "dob": "1980-04-02",
            "contact": {"phone": "+1-555-0100", "email": "jane@example.org"},
        }
    }
    response = requests.post(f"{API}/link", json=body, headers=headers, timeout=10)
    print(f"POST /link -> {response.status_code} {response.text}")
    if response.status_code != 202:
        return 1
    replay = requests.post(f"{API}/link", json=body, headers=headers, timeout=10)
    print(
        f"POST /link again (same key) -> {replay.status_code}, "
        f"Idempotent-Replayed: {replay.headers.get('Idempotent-Replayed')}"
    )
    workflow_id = response.json()["workflow-id"]
    seen: list[str] = [response.json()["status"]]
    deadline = time.monotonic() + 60
    status = follow(token, workflow_id, seen, deadline=deadline)
    print("path: " + " -> ".join(seen))
    wait_webhook(receiver, workflow_id, "link.completed", deadline=deadline)
    ok = status.get("status") == "COMPLETED"
    print("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
