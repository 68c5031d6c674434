"""Flower as docs/operations.md "Flower" runs it: basic auth, events left off, against the Redis
broker of the end-to-end stack and its real worker."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import wait_until
from tests.processes import BIN, child_env, free_port, running, wait_http

CREDENTIALS = ("ops", "flower-test-password")


@pytest.fixture
def flower(stack: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    args = [
        str(BIN / "celery"),
        "-A",
        "config",
        "flower",
        "--address=127.0.0.1",
        f"--port={port}",
        f"--basic-auth={':'.join(CREDENTIALS)}",
        "--enable-events=false",
    ]
    log = tmp_path / "flower.log"
    with running(args, env=child_env(), log=log.open("wb")):
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthcheck", timeout=30)
        yield base


def test_flower_needs_credentials_and_lists_the_worker(flower: str, stack: dict[str, Any]) -> None:
    for path in ("/api/workers", "/workers", "/"):
        assert requests.get(f"{flower}{path}", timeout=10).status_code == 401
        wrong = requests.get(f"{flower}{path}", auth=("ops", "wrong"), timeout=10)
        assert wrong.status_code == 401

    def listed() -> dict[str, Any] | None:
        response = requests.get(
            f"{flower}/api/workers", params={"refresh": "1"}, auth=CREDENTIALS, timeout=10
        )
        assert response.status_code == 200, response.text
        workers: dict[str, Any] = response.json()
        return workers if any(name.startswith("worker@") for name in workers) else None

    workers = wait_until(listed, timeout=30, what="Flower to list the e2e worker")
    [name] = [name for name in workers if name.startswith("worker@")]
    # What Flower reads by remote control, with task events still off.
    assert workers[name]["stats"]["pool"]["max-concurrency"] == 4
    assert {queue["name"] for queue in workers[name]["active_queues"]} == {"celery"}
    # The dashboard page renders (its worker rows come from heartbeats, which this stack's
    # worker does not send: --without-heartbeat).
    assert requests.get(f"{flower}/workers", auth=CREDENTIALS, timeout=10).status_code == 200
    # --enable-events=false: Flower did not switch the worker's task events on.
    assert "enabled by remote" not in stack["worker_log"].read_text(errors="replace")
