"""Every relation the Guarantees rely on refuses a settings file that breaks it, and
docs/guarantees.md lists exactly the relations that are checked (config/setting_rules.py)."""

import re

import pytest

from config.setting_rules import RULES, render
from tests.processes import ROOT
from tests.test_settings import load_settings

AMQP = "amqp://guest:guest@127.0.0.1:5672//"

# One settings file per rule that breaks it and only it (every other setting at its default):
# written out here, not derived from the rule, so that a rule that stopped checking fails.
BREAKING: dict[str, dict[str, str]] = {
    "CELERY_TASK_SOFT_TIME_LIMIT < CELERY_TASK_TIME_LIMIT": {"CELERY_TASK_SOFT_TIME_LIMIT": "90"},
    "INTERNAL_SEARCH_CONNECT_TIMEOUT + INTERNAL_SEARCH_READ_TIMEOUT"
    " < CELERY_TASK_SOFT_TIME_LIMIT": {"INTERNAL_SEARCH_READ_TIMEOUT": "58"},
    "0 < WORKFLOW_HEARTBEAT_SECONDS": {"WORKFLOW_HEARTBEAT_SECONDS": "0"},
    # Two beats a lease: one missed beat would already lose a live worker's claims.
    "WORKFLOW_HEARTBEAT_SECONDS x 3 <= WORKFLOW_CLAIM_LEASE_SECONDS": {
        "WORKFLOW_HEARTBEAT_SECONDS": "15"
    },
    "INTERNAL_SEARCH_CONNECT_TIMEOUT + INTERNAL_SEARCH_READ_TIMEOUT"
    " < WORKFLOW_CLAIM_LEASE_SECONDS": {"INTERNAL_SEARCH_READ_TIMEOUT": "27"},
    "0 <= WORKER_SHUTDOWN_GRACE_SECONDS < CELERY_TASK_SOFT_TIME_LIMIT": {
        "WORKER_SHUTDOWN_GRACE_SECONDS": "60"
    },
    # 5 attempts x (60 + 3.05 + 10) = 365 s of retries, past a 300 s deadline.
    "WORKFLOW_MAX_ATTEMPTS x (RETRY_BACKOFF_MAX_SECONDS + INTERNAL_SEARCH_CONNECT_TIMEOUT"
    " + INTERNAL_SEARCH_READ_TIMEOUT) < WORKFLOW_DEADLINE_SECONDS": {
        "WORKFLOW_DEADLINE_SECONDS": "300"
    },
    "RETRY_BACKOFF_BASE_SECONDS <= RETRY_BACKOFF_MAX_SECONDS": {"RETRY_BACKOFF_BASE_SECONDS": "90"},
    "CELERY_VISIBILITY_TIMEOUT >= 4 x CELERY_TASK_TIME_LIMIT (Redis broker)": {
        "CELERY_VISIBILITY_TIMEOUT": "300"
    },
    "0 < INTERNAL_SEARCH_BREAKER_PROBE_SECONDS": {"INTERNAL_SEARCH_BREAKER_PROBE_SECONDS": "0"},
    "LINK_BATCH_RETENTION_DAYS x 86400 >= IDEMPOTENCY_TTL_SECONDS": {
        "LINK_BATCH_RETENTION_DAYS": "1",
        "IDEMPOTENCY_TTL_SECONDS": "172800",
    },
    "RABBITMQ_CONSUMER_TIMEOUT >= 4 x CELERY_TASK_TIME_LIMIT (RabbitMQ broker)": {
        "CELERY_BROKER_URL": AMQP,
        "RABBITMQ_CONSUMER_TIMEOUT": "300",
    },
    "REVIEW_MIN_SCORE <= AUTO_LINK_SCORE": {"REVIEW_MIN_SCORE": "0.95"},
}


def test_every_rule_has_its_breaking_settings_file() -> None:
    assert sorted(BREAKING) == sorted(rule.rule for rule in RULES)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.rule.split()[0])
def test_a_settings_file_that_breaks_the_rule_refuses_to_start(rule) -> None:
    result = load_settings(**BREAKING[rule.rule])
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    # It says which relation, with the values it found, and what to do.
    message = result.stderr.strip().splitlines()[-1]
    assert rule.rule in message and "change one of these settings" in message
    for name, value in BREAKING[rule.rule].items():
        if name in rule.rule:
            assert re.search(rf"{name}={re.escape(value)}(\.0)?\b", message), message


def test_the_defaults_keep_every_rule() -> None:
    assert load_settings().returncode == 0
    assert load_settings(CELERY_BROKER_URL=AMQP).returncode == 0


def test_the_guarantees_list_exactly_the_checked_rules() -> None:
    guarantees = (ROOT / "docs/guarantees.md").read_text()
    found = re.search(
        r"<!-- setting-rules:start -->\n(.*?)\n<!-- setting-rules:end -->", guarantees, re.S
    )
    assert found, "docs/guarantees.md has no setting-rules block"
    assert found.group(1) == render(), (
        "run `python -m config.setting_rules` into docs/guarantees.md"
    )


@pytest.mark.parametrize("name", ["WORKFLOW_IN_FLIGHT_MAX", "INTERNAL_SEARCH_MAX_CONCURRENCY"])
def test_a_bound_of_zero_refuses_to_start(name: str) -> None:
    result = load_settings(**{name: "0"})
    assert result.returncode != 0
    assert f"{name} must be >= 1, got 0" in result.stderr.strip().splitlines()[-1]
