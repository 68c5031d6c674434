"""An idle service prints nothing periodic at INFO (issue 20): beat sends the housekeeping tasks
and a worker runs them, and neither says so unless LOG_LEVEL=DEBUG."""

import time
from pathlib import Path

import pytest

from tests.processes import celery_beat_args, celery_worker_args, child_env, running, wait_for_text

pytestmark = pytest.mark.django_db(transaction=True)

IDLE_SECONDS = 6  # the webhook dispatch runs every second meanwhile: six times


def _idle_output(tmp_path: Path, level: str) -> str:
    """What a worker and beat print in IDLE_SECONDS after both have started, at `level`."""
    env = child_env(LOG_LEVEL=level, WEBHOOK_DISPATCH_INTERVAL_SECONDS="1")
    worker_log, beat_log = tmp_path / f"worker-{level}.log", tmp_path / f"beat-{level}.log"
    with (
        running(celery_worker_args(concurrency=2), env=env, log=worker_log.open("wb")),
        running(celery_beat_args(tmp_path / f"schedule-{level}"), env=env, log=beat_log.open("wb")),
    ):
        wait_for_text(worker_log, "ready.")
        wait_for_text(beat_log, "beat: Starting...")
        time.sleep(1)  # the start-up lines are out
        start = {log: log.stat().st_size for log in (worker_log, beat_log)}
        time.sleep(IDLE_SECONDS)
        return "".join(
            log.read_bytes()[size:].decode(errors="replace") for log, size in start.items()
        )


def test_an_idle_worker_and_beat_print_nothing_at_info(tmp_path: Path) -> None:
    assert _idle_output(tmp_path, "INFO") == ""


def test_at_debug_they_say_what_they_run(tmp_path: Path) -> None:
    # The same run at DEBUG: the tasks were sent and ran, the quiet above is not a dead beat.
    output = _idle_output(tmp_path, "DEBUG")
    assert output.count("Sending due task dispatch-due-webhooks") >= IDLE_SECONDS - 2, output[
        -2000:
    ]
    assert "workflows.dispatch_due_webhooks" in output and "succeeded" in output, output[-2000:]
