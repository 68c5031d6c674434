"""Log lines and X-Request-ID: one JSON object per line carrying the request, customer and
workflow ids when known, never demographics; the request id echoed, made when missing, and
replaced when it is not a plain token."""

import copy
import io
import json
import logging
import logging.config
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from rest_framework.test import APIClient

from config import log_context
from linking import services as linking_services
from linking.tasks import process_workflow
from merchant.services import CustomerCredentials
from tests import processes
from tests.conftest import LinkClient, every_logger_into
from tests.test_phi_canary import CANARIES, canary, leaks
from tests.test_settings import load_settings
from workflows.tasks import deliver_webhook

HEX_ID = re.compile(r"[0-9a-f]{32}")


# --- X-Request-ID --------------------------------------------------------------------------------


def test_a_request_without_an_id_gets_one() -> None:
    first = APIClient().get("/healthz")["X-Request-ID"]
    second = APIClient().get("/healthz")["X-Request-ID"]
    assert HEX_ID.fullmatch(first) and HEX_ID.fullmatch(second)
    assert first != second


@pytest.mark.parametrize("sent", ["abc", "Req-42_a.b", "0" * 128, str(uuid.uuid4())])
def test_a_plain_request_id_is_echoed(sent: str) -> None:
    assert APIClient().get("/healthz", HTTP_X_REQUEST_ID=sent)["X-Request-ID"] == sent


@pytest.mark.parametrize(
    "sent",
    ["", "0" * 129, "has space", "semi;colon", 'quote"d', "new\nline", "ünïcode", "a/b", "{}"],
)
def test_a_malformed_request_id_is_replaced(sent: str) -> None:
    echoed = APIClient().get("/healthz", HTTP_X_REQUEST_ID=sent)["X-Request-ID"]
    assert HEX_ID.fullmatch(echoed)
    assert echoed != sent


@pytest.mark.django_db
def test_every_answer_carries_the_request_id(settings: Any) -> None:
    client = APIClient()
    assert client.get("/no-such-path", HTTP_X_REQUEST_ID="r-404")["X-Request-ID"] == "r-404"
    assert client.post("/link", {}, format="json", HTTP_X_REQUEST_ID="r-401")["X-Request-ID"] == (
        "r-401"
    )
    # The https redirect of SecurityMiddleware happens before any view: the id is on it too.
    settings.SECURE_SSL_REDIRECT = True
    redirect = APIClient().get("/link/status/x", HTTP_X_REQUEST_ID="r-301")
    assert redirect.status_code == 301
    assert redirect["X-Request-ID"] == "r-301"


# --- JSON lines ----------------------------------------------------------------------------------


def configured(kind: str, name: str) -> Any:
    """The formatter or filter LOGGING defines under `name`, built as dictConfig builds it
    (whatever LOG_FORMAT this run has)."""
    configurator = logging.config.DictConfigurator({})
    logging_config: dict[str, Any] = django_settings.LOGGING
    definition = copy.deepcopy(logging_config[kind][name])
    if kind == "formatters":
        return configurator.configure_formatter(definition)
    return configurator.configure_filter(definition)


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Every record of every logger at DEBUG, as the production handler writes it (LOGGING's
    `json` formatter and `context` filter)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(configured("formatters", "json"))
    handler.addFilter(configured("filters", "context"))
    with every_logger_into(handler):
        yield stream


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_has_the_fields_and_nothing_else(json_lines: io.StringIO) -> None:
    request_token = log_context.request_id.set("req-1")
    customer = uuid.uuid4()
    customer_token = log_context.customer_id.set(customer)
    try:
        logging.getLogger("merchant.test").warning("hello %s", "world", extra={"size": 3})
    finally:
        log_context.customer_id.reset(customer_token)
        log_context.request_id.reset(request_token)
    logging.getLogger("merchant.test").info("outside")
    inside, outside = parsed(json_lines)
    assert inside.pop("time").endswith("+00:00")
    assert inside == {
        "level": "WARNING",
        "logger": "merchant.test",
        "message": "hello world",
        "size": 3,
        "request_id": "req-1",
        "customer_id": str(customer),
    }
    assert set(outside) == {"level", "logger", "message", "time"}  # unknown ids: absent


def test_the_text_format_carries_the_ids() -> None:
    formatter = configured("formatters", "text")
    record = logging.LogRecord("merchant.test", logging.INFO, __file__, 1, "hi", None, None)
    token = log_context.workflow_id.set("wf-1")
    try:
        configured("filters", "context").filter(record)
    finally:
        log_context.workflow_id.reset(token)
    assert formatter.format(record).endswith(" hi request_id=- workflow_id=wf-1 customer_id=-")


def test_a_post_link_logs_its_ids_and_no_demographics(
    credentials: CustomerCredentials,
    json_lines: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = LinkClient(credentials.token)
    accepted = api.post_link(canary(), key="canary-1", HTTP_X_REQUEST_ID="req-accepted")
    assert accepted.status_code == 202, accepted.content

    # A failure logs at the production levels (merchant.problems, django.request: ERROR).
    def crash(**kwargs: Any) -> Any:
        raise RuntimeError("ack path crashed")

    monkeypatch.setattr(linking_services, "link_accept", crash)
    crashed = api.post_link(canary(), key="canary-2", HTTP_X_REQUEST_ID="req-crashed")
    assert crashed.status_code == 500
    assert crashed["X-Request-ID"] == "req-crashed"

    lines = parsed(json_lines)
    assert lines, "nothing was logged"
    errors = [line for line in lines if line["request_id"] == "req-crashed"]
    assert {line["logger"] for line in errors if line["level"] == "ERROR"} >= {
        "merchant.problems",
        "django.request",
    }
    for line in errors:
        assert line["customer_id"] == str(credentials.customer.id)
    assert all(line.get("request_id") in {"req-accepted", "req-crashed"} for line in lines)
    assert leaks(json_lines.getvalue()) == set()


def test_the_canary_search_would_see_demographics_in_a_line(json_lines: io.StringIO) -> None:
    """The search above can fail: a line with a canary in its message or an extra is found."""
    logging.getLogger("merchant.test").warning("%s", CANARIES[0], extra={"x": CANARIES[1]})
    assert leaks(json_lines.getvalue()) == {CANARIES[0], CANARIES[1]}


def test_log_format_must_be_json_or_text() -> None:
    result = load_settings(LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and "LOG_FORMAT" in result.stderr


# --- Celery tasks ----------------------------------------------------------------------------


def test_a_workflow_task_sets_its_workflow_id_and_others_clear_it() -> None:
    message = {"workflow-id": "wf-7", "customer-id": "c"}
    log_context._task_context(task=process_workflow, args=(message,), kwargs={})
    assert log_context.workflow_id.get() == "wf-7"
    log_context._task_context_end()
    assert log_context.workflow_id.get() is None
    log_context._task_context(task=process_workflow, args=(), kwargs={"message": message})
    assert log_context.workflow_id.get() == "wf-7"
    log_context._task_context(task=deliver_webhook, args=(5,), kwargs={})
    assert log_context.workflow_id.get() is None  # never a previous task's id


def _worker_lines(log: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]


@pytest.mark.django_db
def test_a_worker_logs_json_lines_with_the_workflow_id(
    tmp_path: Path, redis_db: redis.Redis
) -> None:
    """A real worker: Celery leaves LOGGING in place (JSON, the context filter) at the level of
    its `--loglevel` (INFO here), and the lines of a process_workflow run carry the id of the
    workflow in its message. LOG_LEVEL=DEBUG: Celery's own lines per task received and
    succeeded are shown only then (tests/test_quiet_logs.py)."""
    log = tmp_path / "worker.log"
    env = processes.child_env(LOG_FORMAT="json", LOG_LEVEL="DEBUG")
    workflow = str(uuid.uuid4())  # unknown: the task finds nothing to do and succeeds
    with log.open("wb") as out, processes.running(processes.celery_worker_args(), env=env, log=out):
        processes.wait_for_text(log, "ready.")
        process_workflow.apply_async(args=({"workflow-id": workflow},))
        processes.wait_for_text(log, "succeeded", timeout=20)
    lines = _worker_lines(log)
    assert any(line["message"].endswith(" ready.") for line in lines)
    succeeded = [line for line in lines if "succeeded" in line["message"]]
    assert [line.get("workflow_id") for line in succeeded] == [workflow]
    # Received by the consumer before the task ran: no workflow id yet, and no task arguments.
    received = [line for line in lines if "received" in line["message"]]
    assert received and all("workflow_id" not in line for line in received)
    assert all("data" not in line for line in lines)
