"""Prometheus metrics (linking/metrics.py, workflows/metrics.py, served by config/metrics.py): the
ack counter and histogram, the workflow gauges, who may scrape /metrics, multiprocess
aggregation, and the example alert rules."""

import datetime as dt
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from django.db import OperationalError
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from linking import services
from linking.internal_search import InternalSearchError, internal_search_match
from merchant.models import Customer
from merchant.services import CustomerCredentials
from tests.conftest import LinkClient, link_body
from tests.processes import ROOT, child_env, free_port
from workflows.models import PENDING_STATES, Status, Workflow
from workflows.selectors import workflows_stuck
from workflows.services import workflows_reconcile

pytestmark = pytest.mark.django_db

ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(**extra: Any) -> Samples:
    response = Client().get("/metrics", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return parse(response.content.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples that moved (ignoring the gauges read from the database and process stats)."""
    moved = {}
    for key, now in after.items():
        if key[0].startswith("merchant_") and not key[0].startswith(
            ("merchant_workflows", "merchant_scheduler_", "merchant_breaker_")
        ):
            change = now - before.get(key, 0.0)
            if change:
                moved[key] = change
    return moved


def acks(outcome: str, status: int) -> tuple[str, frozenset[tuple[str, str]]]:
    return (
        "merchant_link_acks_total",
        frozenset({"outcome": outcome, "status": str(status)}.items()),
    )


# --- the ack path --------------------------------------------------------------------------------


def test_each_post_link_moves_the_counter_and_histogram_exactly_once(
    api: LinkClient, credentials: CustomerCredentials
) -> None:
    before = scrape()
    first = link_body()
    assert api.post_link(first, key="k-1").status_code == 202
    assert api.post_link(link_body(), key="k-2").status_code == 202
    assert api.post_link(first, key="k-1").status_code == 202  # replay
    assert api.post_link(link_body(), key="k-1").status_code == 422  # same key, other body
    assert api.post_link(link_body(), key=None).status_code == 400  # no Idempotency-Key
    assert api.post_link({"patient": {"id": "nope"}}, key="k-3").status_code == 400
    assert LinkClient("not-a-token").post_link(link_body(), key="k-4").status_code == 401
    with mock.patch.object(services, "link_accept", side_effect=services.RequestInFlight()):
        assert api.post_link(link_body(), key="k-5").status_code == 409
    with mock.patch.object(services, "link_accept", side_effect=OperationalError("down")):
        assert api.post_link(link_body(), key="k-6").status_code == 503
    api.client.get("/link")  # 405, not an ack: not counted
    after = scrape()

    moved = delta(before, after)
    assert {key: n for key, n in moved.items() if key[0] == "merchant_link_acks_total"} == {
        acks("accepted", 202): 2,
        acks("replayed", 202): 1,
        acks("idempotency-key-reused", 422): 1,
        acks("idempotency-key-missing", 400): 1,
        acks("validation-error", 400): 1,
        acks("unauthorized", 401): 1,
        acks("idempotency-request-in-flight", 409): 1,
        acks("service-unavailable", 503): 1,
    }
    histogram = "merchant_link_ack_seconds"
    assert moved[(f"{histogram}_count", frozenset())] == 9
    assert moved[(f"{histogram}_bucket", frozenset({("le", "+Inf")}))] == 9
    assert moved[(f"{histogram}_bucket", frozenset({("le", "5.0")}))] == 9
    assert 0 < moved[(f"{histogram}_sum", frozenset())] < 9 * 5
    # Nothing else moved: one counter and one histogram per request.
    assert {key[0] for key in moved} == {
        "merchant_link_acks_total",
        f"{histogram}_count",
        f"{histogram}_bucket",
        f"{histogram}_sum",
    }
    # No id of any kind in a label.
    text = Client().get("/metrics").content.decode()
    assert str(credentials.customer.id) not in text
    assert "Jane" not in text


def test_rate_limited_posts_are_counted_as_429(api: LinkClient, settings: Any) -> None:
    settings.RATE_LIMIT_LINK_CREATE = "1/min"
    before = scrape()
    assert api.post_link(link_body(), key="r-1").status_code == 202
    assert api.post_link(link_body(), key="r-2").status_code == 429
    after = scrape()
    assert delta(before, after)[acks("rate-limited", 429)] == 1


# --- the workflow gauges -------------------------------------------------------------------------


def make(customer: Customer, status: str, *, age_seconds: int = 0) -> Workflow:
    workflow = Workflow(customer=customer, patient_id=uuid.uuid4(), status=status)
    workflow.save()
    if age_seconds:
        Workflow.objects.filter(id=workflow.id).update(
            updated_at=timezone.now() - dt.timedelta(seconds=age_seconds)
        )
    return workflow


def test_workflows_by_state_and_stuck_equal_the_database(
    credentials: CustomerCredentials, settings: Any
) -> None:
    settings.RECONCILE_STALE_AFTER_SECONDS = 600
    customer = credentials.customer
    for status, count in [
        (Status.RECEIVED, 3),
        (Status.IN_PROGRESS, 1),
        (Status.REVIEW, 2),
        (Status.COMPLETED, 4),
        (Status.FAILED, 1),
    ]:
        for _ in range(count):
            make(customer, status)
    make(customer, Status.RECEIVED, age_seconds=700)  # stuck
    make(customer, Status.REVIEW, age_seconds=7000)  # stuck (REVIEW counts, as in the report)
    make(customer, Status.IN_PROGRESS, age_seconds=500)  # not yet
    make(customer, Status.COMPLETED, age_seconds=7000)  # ended: never stuck

    samples = scrape()
    assert value(samples, "merchant_workflows_collect_success") == 1
    for state in Status:
        assert value(samples, "merchant_workflows", state=state.value) == (
            Workflow.objects.filter(status=state).count()
        ), state
    for state in PENDING_STATES:
        assert value(samples, "merchant_workflows_stuck", state=state.value) == (
            workflows_stuck().filter(status=state).count()
        ), state
    assert value(samples, "merchant_workflows", state="RECEIVED") == 4
    assert value(samples, "merchant_workflows_stuck", state="RECEIVED") == 1
    assert value(samples, "merchant_workflows_stuck", state="REVIEW") == 1
    assert value(samples, "merchant_workflows_stuck", state="IN_PROGRESS") == 0
    assert ("merchant_workflows_stuck", frozenset({("state", "COMPLETED")})) not in samples


def test_a_database_failure_is_reported_not_a_500(credentials: CustomerCredentials) -> None:
    with mock.patch("django.db.models.query.QuerySet.__iter__", side_effect=OperationalError):
        samples = scrape()
    assert value(samples, "merchant_workflows_collect_success") == 0
    assert not any(name == "merchant_workflows" for name, _ in samples)


# --- the other services --------------------------------------------------------------------------


def test_a_sweep_counts_its_run_and_requeues(credentials: CustomerCredentials, settings: Any):
    settings.RECONCILE_STALE_AFTER_SECONDS = 300
    settings.WORKFLOW_MAX_ATTEMPTS = 5
    # Made due by the sweep: idle (neither due nor in flight: waiting for a search's callback)
    # for longer than the stale window.
    idle = [make(credentials.customer, Status.REQUESTED, age_seconds=400) for _ in range(3)]
    idle.append(make(credentials.customer, Status.REQUESTED))  # idle, but not for long enough
    Workflow.objects.filter(id__in=[w.id for w in idle]).update(due_at=None)
    # Due as long, waiting for its turn: the scheduler's, neither made due nor counted.
    make(credentials.customer, Status.RECEIVED, age_seconds=400)
    before = scrape()
    workflows_reconcile()
    after = scrape()
    assert delta(before, after) == {
        ("merchant_reconcile_runs_total", frozenset()): 1,
        ("merchant_reconcile_requeued_total", frozenset()): 3,
    }


def test_an_unreachable_internal_system_is_counted_by_kind(settings: Any) -> None:
    settings.INTERNAL_SEARCH_URL = f"http://127.0.0.1:{free_port()}/fhir"  # nobody listens
    before = scrape()
    with pytest.raises(InternalSearchError):
        internal_search_match(link_body()["patient"])
    after = scrape()
    moved = delta(before, after)
    errors = frozenset({"operation": "match", "kind": "connection"}.items())
    assert moved[("merchant_internal_search_errors_total", errors)] == 1
    count = ("merchant_internal_search_seconds_count", frozenset({("operation", "match")}))
    assert moved[count] == 1


# --- who may scrape ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote_addr", "status"),
    [
        ("127.0.0.1", 200),
        ("::1", 200),
        ("10.1.2.3", 200),
        ("192.168.0.9", 200),
        ("172.16.5.5", 200),
        ("::ffff:10.0.0.1", 200),
        ("8.8.8.8", 403),
        ("::ffff:8.8.8.8", 403),
        ("2001:4860:4860::8888", 403),
        ("", 403),
    ],
)
def test_without_a_token_only_loopback_and_private_addresses(remote_addr: str, status: int):
    response = Client().get("/metrics", REMOTE_ADDR=remote_addr)
    assert response.status_code == status
    if status == 403:
        assert response["Content-Type"] == "application/problem+json"
        assert b"merchant_" not in response.content


def test_with_a_token_it_is_required_from_everywhere(
    settings: Any, credentials: CustomerCredentials
) -> None:
    settings.METRICS_TOKEN = "metrics-secret-0123456789"
    client = Client()
    assert client.get("/metrics").status_code == 401  # loopback is no longer enough
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-secret-012345678")
    assert wrong.status_code == 401
    assert wrong["WWW-Authenticate"].startswith("Bearer")
    customer_token = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {credentials.token}")
    assert customer_token.status_code == 401
    assert client.get("/metrics", HTTP_CUSTOMER_TOKEN=credentials.token).status_code == 401
    basic = client.get("/metrics", HTTP_AUTHORIZATION="Basic metrics-secret-0123456789")
    assert basic.status_code == 401
    ok = client.get(
        "/metrics",
        HTTP_AUTHORIZATION="Bearer metrics-secret-0123456789",
        REMOTE_ADDR="203.0.113.7",
    )
    assert ok.status_code == 200
    assert b"merchant_link_acks_total" in ok.content or b"merchant_link_ack_seconds" in ok.content


def test_only_get_not_in_the_schema_no_redirect_no_store(settings: Any) -> None:
    client = Client()
    assert client.post("/metrics").status_code == 405
    assert client.get("/metrics")["Cache-Control"] == "no-store"
    schema = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert "/metrics" not in schema.json()["paths"]
    settings.SECURE_SSL_REDIRECT = True
    assert Client().get("/metrics").status_code == 200
    assert Client().get("/link/status/x").status_code == 301


# --- multiprocess mode ---------------------------------------------------------------------------

_RECORD = """
import django, sys, time
django.setup()
from linking import metrics as link_metrics
from workflows import metrics as workflow_metrics
for _ in range(int(sys.argv[1])):
    link_metrics._ack_observe("accepted", 202, time.perf_counter())
workflow_metrics.webhook_attempt_settled("DELIVERED")
"""

_SCRAPE = """
import django
django.setup()
from django.test import Client
response = Client().get("/metrics")
assert response.status_code == 200, response.status_code
print(response.content.decode())
"""


def _python(code: str, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_multiprocess_mode_adds_up_every_process(tmp_path: Path) -> None:
    env = child_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
    _python(_RECORD, "3", env=env)
    _python(_RECORD, "4", env=env)
    assert len(list((tmp_path / "prom").glob("counter_*.db"))) == 2  # one file per process
    samples = parse(_python(_SCRAPE, env=env))  # a third process serves /metrics
    assert value(samples, "merchant_link_acks_total", outcome="accepted", status="202") == 7
    assert value(samples, "merchant_link_ack_seconds_count") == 7
    assert value(samples, "merchant_link_ack_seconds_bucket", le="+Inf") == 7
    assert value(samples, "merchant_webhook_attempts_total", outcome="delivered") == 2
    assert value(samples, "merchant_workflows", state="COMPLETED") == 0  # the collector too


def test_an_empty_multiproc_variable_means_off(tmp_path: Path) -> None:
    env = child_env(PROMETHEUS_MULTIPROC_DIR="")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_RECORD), "1"],
        cwd=tmp_path,  # files would land in the working directory
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


# --- the alert rules -----------------------------------------------------------------------------


def test_alert_rules_are_valid_and_use_exported_metrics() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    assert {group["name"] for group in document["groups"]}
    assert len(rules) >= 4
    exported = {name for name, _ in scrape()}
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        used = set(re.findall(r"\bmerchant_[a-z_]+", rule["expr"]))
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)
    exprs = " ".join(rule["expr"] for rule in rules)
    for wanted in (
        "merchant_workflows_stuck",
        "merchant_webhook_attempts_total",
        "merchant_internal_search_errors_total",
        "merchant_link_acks_total",
    ):
        assert wanted in exprs
