"""Metrics end to end: gunicorn with two workers in multiprocess mode (config/gunicorn.py, as the
Procfile starts it) and a real Celery worker serving its own metrics port, on a redis-server of
their own (so that no other test's worker takes the messages), the FHIR stand-in and a webhook
receiver. Not the tests/e2e package's `stack`, and not in that package: its worker has no
metrics port, and while that package runs its worker's dispatcher LISTENs on this same database
and would take these workflows too (so they would never reach this test's worker)."""

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from merchant.services import CustomerCredentials, customer_onboard
from standin.receiver import ReceiverServer, make_receiver
from standin.server import make_server
from tests.conftest import link_body
from tests.e2e.conftest import wait_until
from tests.processes import (
    BIN,
    celery_worker_args,
    child_env,
    free_port,
    redis_server,
    running,
    serving,
    wait_for_text,
    wait_http,
)
from tests.test_metrics import Samples, parse, value
from workflows.models import Status, Workflow

pytestmark = pytest.mark.django_db(transaction=True)

LINKS = 3


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[dict[str, Any]]:
    standin = make_server("127.0.0.1", 0)
    receiver = make_receiver()
    web_dir = tmp_path / "prom-web"
    web_dir.mkdir()
    stale = web_dir / "counter_999999.db"  # left by an earlier run: must not be counted
    stale.write_bytes(b"\0" * 64)
    worker_port = free_port()
    web_port = free_port()
    with (
        serving(standin),
        serving(receiver),
        redis_server(tmp_path) as redis_url,
    ):
        env = child_env(
            REDIS_URL=redis_url,
            CELERY_BROKER_URL=redis_url,
            INTERNAL_SEARCH_URL=standin.base_url,
            LOG_LEVEL="INFO",
            METRICS_TOKEN="",
        )
        worker_env = {
            **env,
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom-worker"),
            "METRICS_WORKER_PORT": str(worker_port),
            "METRICS_WORKER_ADDR": "127.0.0.1",
        }
        web_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(web_dir)}
        web_args = [
            str(BIN / "gunicorn"),
            "config.wsgi",
            "--config",
            "config/gunicorn.py",
            "--bind",
            f"127.0.0.1:{web_port}",
            "--workers",
            "2",
            "--timeout",
            "30",
        ]
        worker_log = tmp_path / "worker.log"
        web_log = tmp_path / "web.log"
        with (
            running(celery_worker_args(), env=worker_env, log=worker_log.open("wb")),
            running(web_args, env=web_env, log=web_log.open("wb")),
        ):
            web = f"http://127.0.0.1:{web_port}"
            wait_http(f"{web}/healthz")
            wait_for_text(worker_log, "ready.")
            wait_http(f"http://127.0.0.1:{worker_port}/metrics")
            yield {
                "web": web,
                "worker_metrics": f"http://127.0.0.1:{worker_port}/metrics",
                "receiver": receiver,
                "web_dir": web_dir,
                "stale": stale,
                "logs": (worker_log, web_log),
            }


def scrape(url: str) -> Samples:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return parse(response.text)


@pytest.fixture
def customer(metered: dict[str, Any]) -> Iterator[CustomerCredentials]:
    receiver: ReceiverServer = metered["receiver"]
    credentials = customer_onboard(name="Metrics Health", webhook_url=f"{receiver.url}/hooks")
    receiver.state.secret = credentials.customer.webhook_secret
    yield credentials
    receiver.state.secret = None


def test_a_workflow_moves_the_web_and_worker_metrics(
    metered: dict[str, Any], customer: CustomerCredentials
) -> None:
    web, worker_metrics = metered["web"], metered["worker_metrics"]
    assert not metered["stale"].exists()  # gunicorn's on_starting emptied the directory
    headers = {"customer-token": customer.token}
    ids = []
    first = link_body()
    for n in range(LINKS):
        body = first if n == 0 else link_body()
        answer = requests.post(
            f"{web}/link", json=body, headers={**headers, "Idempotency-Key": f"m-{n}"}, timeout=10
        )
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["workflow-id"])
    replay = requests.post(
        f"{web}/link", json=first, headers={**headers, "Idempotency-Key": "m-0"}, timeout=10
    )
    assert replay.headers.get("Idempotent-Replayed") == "true"

    def ended() -> bool:
        return Workflow.objects.filter(id__in=ids, status=Status.COMPLETED).count() == LINKS

    wait_until(ended, timeout=30, what="every workflow COMPLETED")

    def webhooks_counted() -> Samples | None:
        samples = scrape(worker_metrics)
        delivered = value(samples, "merchant_webhook_attempts_total", outcome="delivered")
        return samples if delivered >= LINKS else None

    worker: Samples = wait_until(webhooks_counted, timeout=30, what="webhook metrics")

    # The worker's port: search latency, webhook outcomes, 202-to-terminal; exactly these runs.
    assert value(worker, "merchant_webhook_attempts_total", outcome="delivered") == LINKS
    assert value(worker, "merchant_webhook_attempts_total", outcome="retrying") == 0
    assert value(worker, "merchant_internal_search_seconds_count", operation="match") == LINKS
    assert value(worker, "merchant_internal_search_seconds_sum", operation="match") > 0
    assert not any(
        name == "merchant_internal_search_errors_total" and n for (name, _), n in worker.items()
    )
    terminal = "merchant_workflow_time_to_terminal_seconds"
    assert value(worker, f"{terminal}_count", status="COMPLETED") == LINKS
    assert 0 < value(worker, f"{terminal}_sum", status="COMPLETED") < 30 * LINKS
    assert value(worker, f"{terminal}_bucket", status="COMPLETED", le="+Inf") == LINKS
    # The workflow counts are the web's alone (every worker would repeat them)...
    assert not any(name.startswith("merchant_workflows") for name, _ in worker)
    # ...and the acks the web's: nothing of the web was counted in the worker.
    assert value(worker, "merchant_link_acks_total", outcome="accepted", status="202") == 0

    # The web: both gunicorn workers' samples added up, whichever process answers the scrape.
    for _ in range(4):
        samples = scrape(f"{web}/metrics")
        assert value(samples, "merchant_link_acks_total", outcome="accepted", status="202") == 3
        assert value(samples, "merchant_link_acks_total", outcome="replayed", status="202") == 1
        assert value(samples, "merchant_link_ack_seconds_count") == LINKS + 1
        assert value(samples, "merchant_workflows", state="COMPLETED") == LINKS
        assert value(samples, "merchant_workflows", state="RECEIVED") == 0
        assert value(samples, "merchant_webhook_attempts_total", outcome="delivered") == 0
    files = sorted(p.name for p in metered["web_dir"].iterdir())
    assert files and all(name.endswith(".db") for name in files), files
    assert "counter_999999.db" not in files


def test_gunicorn_config_file_is_the_procfiles() -> None:
    """The Procfile's web line loads config/gunicorn.py (the directory is emptied at start)."""
    from tests.processes import ROOT

    web = next(
        line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:")
    )
    assert "--config config/gunicorn.py" in web
    checked = subprocess.run(
        [str(BIN / "gunicorn"), "--check-config", "--config", "config/gunicorn.py", "config.wsgi"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr[-2000:]
