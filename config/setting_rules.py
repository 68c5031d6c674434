"""The relations between settings that the Guarantees rely on, checked when the settings load.

One list: `config/settings.py` calls `check()` on itself, and docs/guarantees.md's "What the
deployment must provide" shows `render()` of the same list (tests/test_setting_rules.py keeps
the two equal and proves each rule refuses a settings file that breaks it). A broken relation
stops every process at start-up with an ImproperlyConfigured that names the settings and what to
change, instead of a workflow failing days later.

Run `python -m config.setting_rules` to print docs/guarantees.md's list.
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

Settings = Mapping[str, Any]


@dataclass(frozen=True)
class Rule:
    rule: str  # the relation, in the settings' own names
    why: str  # what breaks when it does not hold
    holds: Callable[[Settings], bool]
    applies: Callable[[Settings], bool] = lambda s: True


def _redis(s: Settings) -> bool:
    return bool(s["BROKER_IS_REDIS"])


def _amqp(s: Settings) -> bool:
    return bool(s["BROKER_IS_AMQP"])


RULES: tuple[Rule, ...] = (
    Rule(
        "CELERY_TASK_SOFT_TIME_LIMIT < CELERY_TASK_TIME_LIMIT",
        "a task is asked to stop, and records why, before it is killed",
        lambda s: s["CELERY_TASK_SOFT_TIME_LIMIT"] < s["CELERY_TASK_TIME_LIMIT"],
    ),
    Rule(
        "INTERNAL_SEARCH_CONNECT_TIMEOUT + INTERNAL_SEARCH_READ_TIMEOUT"
        " < CELERY_TASK_SOFT_TIME_LIMIT",
        "a slow internal search ends as a transient error that is retried, not as a task killed"
        " at its time limit that wastes an attempt each time",
        lambda s: (
            s["INTERNAL_SEARCH_CONNECT_TIMEOUT"] + s["INTERNAL_SEARCH_READ_TIMEOUT"]
            < s["CELERY_TASK_SOFT_TIME_LIMIT"]
        ),
    ),
    Rule(
        "0 < WORKFLOW_HEARTBEAT_SECONDS",
        "a worker renews the claims it holds (a heartbeat of 0 would renew without pause)",
        lambda s: s["WORKFLOW_HEARTBEAT_SECONDS"] > 0,
    ),
    Rule(
        "WORKFLOW_HEARTBEAT_SECONDS x 3 <= WORKFLOW_CLAIM_LEASE_SECONDS",
        "a live worker's claim survives two missed heartbeats (a slow statement, a busy"
        " PostgreSQL): nobody takes over work that is still being done",
        lambda s: s["WORKFLOW_HEARTBEAT_SECONDS"] * 3 <= s["WORKFLOW_CLAIM_LEASE_SECONDS"],
    ),
    Rule(
        "INTERNAL_SEARCH_CONNECT_TIMEOUT + INTERNAL_SEARCH_READ_TIMEOUT"
        " < WORKFLOW_CLAIM_LEASE_SECONDS",
        "a claim taken just before the heartbeats stop getting through (PostgreSQL out of reach"
        " for a moment) still covers the search it started: a short blip does not hand a search"
        " in flight to a second worker, which would search again",
        lambda s: (
            s["INTERNAL_SEARCH_CONNECT_TIMEOUT"] + s["INTERNAL_SEARCH_READ_TIMEOUT"]
            < s["WORKFLOW_CLAIM_LEASE_SECONDS"]
        ),
    ),
    Rule(
        "0 <= WORKER_SHUTDOWN_GRACE_SECONDS < CELERY_TASK_SOFT_TIME_LIMIT",
        "a worker shutting down hands its unfinished work back well before a task could be"
        " stopped by its time limit (keep it under the process manager's stop timeout too:"
        " docker/compose.yaml's stop_grace_period)",
        lambda s: 0 <= s["WORKER_SHUTDOWN_GRACE_SECONDS"] < s["CELERY_TASK_SOFT_TIME_LIMIT"],
    ),
    Rule(
        "WORKFLOW_MAX_ATTEMPTS x (RETRY_BACKOFF_MAX_SECONDS + INTERNAL_SEARCH_CONNECT_TIMEOUT"
        " + INTERNAL_SEARCH_READ_TIMEOUT) < WORKFLOW_DEADLINE_SECONDS",
        "a workflow's whole retry schedule fits before its deadline: the deadline ends only work"
        " held up past every attempt's wait, never one still within its retries",
        lambda s: (
            s["WORKFLOW_MAX_ATTEMPTS"]
            * (
                s["RETRY_BACKOFF_MAX_SECONDS"]
                + s["INTERNAL_SEARCH_CONNECT_TIMEOUT"]
                + s["INTERNAL_SEARCH_READ_TIMEOUT"]
            )
            < s["WORKFLOW_DEADLINE_SECONDS"]
        ),
    ),
    Rule(
        "RETRY_BACKOFF_BASE_SECONDS <= RETRY_BACKOFF_MAX_SECONDS",
        "the first retry wait is not already above the longest one",
        lambda s: s["RETRY_BACKOFF_BASE_SECONDS"] <= s["RETRY_BACKOFF_MAX_SECONDS"],
    ),
    Rule(
        "CELERY_VISIBILITY_TIMEOUT >= 4 x CELERY_TASK_TIME_LIMIT (Redis broker)",
        "Redis hands a still-running task to a second worker only after this long",
        lambda s: s["CELERY_VISIBILITY_TIMEOUT"] >= 4 * s["CELERY_TASK_TIME_LIMIT"],
        _redis,
    ),
    Rule(
        "RABBITMQ_CONSUMER_TIMEOUT >= 4 x CELERY_TASK_TIME_LIMIT (RabbitMQ broker)",
        "RabbitMQ closes the channel of a consumer that holds a message longer, and redelivers"
        " everything on it (set the server's consumer_timeout to at least this)",
        lambda s: s["RABBITMQ_CONSUMER_TIMEOUT"] >= 4 * s["CELERY_TASK_TIME_LIMIT"],
        _amqp,
    ),
    Rule(
        "0 < INTERNAL_SEARCH_BREAKER_PROBE_SECONDS",
        "while the internal system is down it is probed once per that many seconds (0 would"
        " probe it without pause)",
        lambda s: s["INTERNAL_SEARCH_BREAKER_PROBE_SECONDS"] > 0,
    ),
    Rule(
        "LINK_BATCH_RETENTION_DAYS x 86400 >= IDEMPOTENCY_TTL_SECONDS",
        "a batch's record outlives its Idempotency-Key: a retried POST /link/batch replays the"
        " first answer for as long as its key does, instead of making a second batch record"
        " (its items' own keys would still replay their workflows)",
        lambda s: s["LINK_BATCH_RETENTION_DAYS"] * 86400 >= s["IDEMPOTENCY_TTL_SECONDS"],
    ),
    Rule(
        "REVIEW_MIN_SCORE <= AUTO_LINK_SCORE",
        "the review band lies below the automatic link band",
        lambda s: s["REVIEW_MIN_SCORE"] <= s["AUTO_LINK_SCORE"],
    ),
)


def check(settings: Settings) -> None:
    """Raise ImproperlyConfigured for the first rule these settings break."""
    for rule in RULES:
        if rule.applies(settings) and not rule.holds(settings):
            now = ", ".join(
                f"{name}={settings[name]}"
                for name in dict.fromkeys(re.findall(r"[A-Z][A-Z_]+[A-Z]", rule.rule))
                if name in settings
            )
            raise ImproperlyConfigured(
                f"{rule.rule} must hold, and it does not ({now}): change one of these settings."
                f" Why: {rule.why}."
            )


def render() -> str:
    """docs/guarantees.md's list (between its `setting-rules` markers)."""
    return "\n".join(f"- `{rule.rule}`: {rule.why}." for rule in RULES)


if __name__ == "__main__":
    print(render())
