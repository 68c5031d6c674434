"""`make demo`: one link request through a running `make run` stack, shown step by step.

Onboards a demo customer (with the same management command ops use), runs a webhook receiver
that verifies each delivery's signature, posts a link request, and prints the status as it moves
RECEIVED -> ... -> COMPLETED, then the verified webhook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import requests

from standin.receiver import make_receiver

API = os.environ.get("DEMO_API_URL", "http://127.0.0.1:8000")
RECEIVER_PORT = int(os.environ.get("DEMO_RECEIVER_PORT", "9000"))
TERMINAL = {"COMPLETED", "FAILED"}


def onboard(webhook_url: str) -> dict[str, str]:
    output = subprocess.run(  # noqa: S603 -- our own manage.py, fixed arguments
        [
            sys.executable,
            "manage.py",
            "onboard_customer",
            "--name",
            f"Demo {time.strftime('%H:%M:%S')}",
            "--webhook-url",
            webhook_url,
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
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


def main() -> int:
    if not service_up(timeout=30):
        print(f"No service at {API}: start it with `make run` in another terminal.")
        return 1
    receiver = make_receiver(port=RECEIVER_PORT, echo=True)
    threading.Thread(target=receiver.serve_forever, args=(0.1,), daemon=True).start()
    try:
        credentials = onboard(f"{receiver.url}/webhooks")
        receiver.state.secret = credentials["webhook_secret"]
        print(f"onboarded customer {credentials['customer_id']}")
        return run(credentials["token"], receiver)
    finally:
        receiver.shutdown()
        receiver.server_close()


def run(token: str, receiver: Any) -> int:
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
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = requests.get(
            f"{API}/link/status/{workflow_id}", headers={"customer-token": token}, timeout=10
        ).json()
        if seen[-1] != status["status"]:
            seen.append(status["status"])
            print(f"status: {status['status']} (result: {status['result']})")
        if status["status"] in TERMINAL:
            break
        time.sleep(0.05)
    print("path: " + " -> ".join(seen))
    while time.monotonic() < deadline and not receiver.deliveries():
        time.sleep(0.1)
    deliveries = receiver.deliveries()
    ok = status.get("status") == "COMPLETED" and bool(deliveries) and deliveries[0].verified
    print("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
