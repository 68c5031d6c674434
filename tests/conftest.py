"""Shared fixtures: the real Redis (own database), customers with tokens, a JSON API client."""

import base64
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from django.conf import settings
from rest_framework.test import APIClient
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from merchant.services import CustomerCredentials, customer_onboard
from standin.server import make_server
from tests.processes import serving
from workflows.dispatcher import Dispatcher
from workflows.webhook_client import webhook_connections_close


@pytest.fixture(autouse=True)
def redis_db() -> Iterator[redis.Redis]:
    """The suite's own Redis database (the broker and the cache), emptied around every test.

    Kombu's exchange bindings survive: without them a running worker's queue can no longer be
    published to ("Cannot route message ... Table empty").
    """
    client = redis.Redis.from_url(settings.REDIS_URL)
    _empty(client)
    yield client
    _empty(client)


@pytest.fixture(autouse=True)
def webhook_connections() -> Iterator[None]:
    """No kept-alive webhook connection outlives its test: each test's receivers are its own,
    and tests count the connections they see."""
    yield
    webhook_connections_close()


def _empty(client: redis.Redis) -> None:
    doomed = [key for key in client.scan_iter() if not key.startswith(b"_kombu.binding.")]
    if doomed:
        client.delete(*doomed)


def broker_messages(client: redis.Redis, queue: str = "celery") -> list[dict[str, Any]]:
    """The task messages waiting in a Redis queue, decoded (headers + args/kwargs)."""
    messages = []
    for raw in client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        messages.append(
            {
                "raw": raw.decode() if isinstance(raw, bytes) else raw,
                "task": envelope["headers"]["task"],
                "args": args,
                "kwargs": kwargs,
            }
        )
    return messages


def queued_workflow_ids(messages: list[dict[str, Any]]) -> list[str]:
    """The workflow ids of these task messages, in order (each message names a batch)."""
    ids: list[str] = []
    for message in messages:
        assert message["task"] == "workflows.process_workflows", message["task"]
        ids += message["args"][0]
    return ids


def queued_delivery_ids(messages: list[dict[str, Any]]) -> list[int]:
    """The webhook delivery ids of these task messages, in order (each names a batch)."""
    ids: list[int] = []
    for message in messages:
        assert message["task"] == "workflows.deliver_webhooks", message["task"]
        ids += message["args"][0]
    return ids


def wait_broker_messages(
    client: redis.Redis, count: int, *, timeout: float = 5, queue: str = "celery"
) -> list[dict[str, Any]]:
    """The queue's messages once there are `count` of them (the dispatcher publishes the ack
    path's, just after the commit)."""
    deadline = time.monotonic() + timeout
    while True:
        messages = broker_messages(client, queue)
        if len(messages) >= count or time.monotonic() > deadline:
            return messages
        time.sleep(0.02)


@contextmanager
def dispatching(*, lead: bool = True) -> Iterator[Dispatcher]:
    """The real dispatcher (workflows/dispatcher.py) on a thread; leading before the block runs
    unless `lead` is false; stopped afterwards."""
    running = Dispatcher(poll_seconds=0.05)
    thread = threading.Thread(target=running.run, name="test-dispatcher", daemon=True)
    thread.start()
    try:
        if lead:
            assert running.leading.wait(10), "the dispatcher never took the lead"
        yield running
    finally:
        running.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.fixture
def dispatcher(transactional_db: None) -> Iterator[Dispatcher]:
    """A leading dispatcher for the test: the ack path's messages reach the broker only through
    it, and only from committed rows."""
    with dispatching() as running:
        yield running


def new_customer(name: str = "Acme Health") -> CustomerCredentials:
    return customer_onboard(name=name, webhook_url="https://hooks.acme.example/merchant")


@pytest.fixture
def standin(settings: Any) -> Iterator[Any]:
    """The FHIR stand-in in this process on a free port, as the internal system (tests that
    need another kind of stand-in define their own)."""
    server = make_server("127.0.0.1", 0)
    settings.INTERNAL_SEARCH_URL = server.base_url
    with serving(server):
        yield server


@pytest.fixture
def credentials(db: None) -> CustomerCredentials:
    return new_customer()


@pytest.fixture
def other_credentials(db: None) -> CustomerCredentials:
    return new_customer("Globex Clinics")


def link_body(**patient_overrides: Any) -> dict[str, Any]:
    patient: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "full_name": "Jane Q Doe",
        "dob": "1980-04-02",
        "contact": {
            "address": "1 Main St, Springfield",
            "phone": "+1-555-0100",
            "email": "jane@example.org",
        },
        "insurance": {"payer": "Acme Health", "member_id": "A123"},
    }
    patient.update(patient_overrides)
    return {"patient": patient}


def not_found_body(response: Any) -> dict[str, Any]:
    """A 404 problem body without `instance`, to compare the 404s of different ids."""
    assert response.status_code == 404
    assert response["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    body.pop("instance")
    return body


class LinkClient:
    """A thin JSON client for the link API with a customer token."""

    def __init__(self, token: str) -> None:
        self.client = APIClient()
        self.token = token

    def post_link(self, body: Any, *, key: str | None = "key-1", **headers: str) -> Any:
        extra: dict[str, Any] = {"HTTP_CUSTOMER_TOKEN": self.token, **headers}
        if key is not None:
            extra["HTTP_IDEMPOTENCY_KEY"] = key
        payload = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return self.client.post("/link", payload, content_type="application/json", **extra)

    def status(self, workflow_id: str) -> Any:
        return self.client.get(f"/link/status/{workflow_id}", HTTP_CUSTOMER_TOKEN=self.token)

    def post_batch(self, body: Any, *, key: str | None = "batch-1") -> Any:
        extra: dict[str, Any] = {"HTTP_CUSTOMER_TOKEN": self.token}
        if key is not None:
            extra["HTTP_IDEMPOTENCY_KEY"] = key
        payload = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return self.client.post("/link/batch", payload, content_type="application/json", **extra)

    def batch(self, batch_id: str) -> Any:
        return self.client.get(f"/link/batch/{batch_id}", HTTP_CUSTOMER_TOKEN=self.token)

    def decide(self, workflow_id: str, body: Any) -> Any:
        return self.client.post(
            f"/link/{workflow_id}/decision",
            json.dumps(body),
            content_type="application/json",
            HTTP_CUSTOMER_TOKEN=self.token,
        )


@pytest.fixture
def api(credentials: CustomerCredentials) -> LinkClient:
    return LinkClient(credentials.token)


@pytest.fixture
def other_api(other_credentials: CustomerCredentials) -> LinkClient:
    return LinkClient(other_credentials.token)


@contextmanager
def every_logger_into(handler: logging.Handler) -> Iterator[None]:
    """Every logger at DEBUG, enabled, with `handler` on the root and on each one that does not
    propagate, whatever LOGGING says; all put back afterwards (the log-leak tests)."""
    root = logging.getLogger()
    loggers = [root] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
        if logger is root or not logger.propagate:
            logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, level, disabled in saved:
            logger.setLevel(level)
            logger.disabled = disabled
            logger.removeHandler(handler)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium (Debian's `chromium` and `chromium-driver`, installed by `make test`)
    that reaches 127.0.0.1 (localhost) only: any other host name resolves to nothing, so a
    page that needs the internet shows it. Its console and its network requests are logged
    (`browser_requests`)."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    options.add_argument(
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # Debian's driver, found by path: Selenium Manager must not try to download one.
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def browser_requests(driver: webdriver.Chrome) -> list[str]:
    """The URLs the pages asked for since the last call (Chromium's performance log), but those
    the browser refused to send itself (a Content-Security-Policy, say): they never left it."""
    sent: dict[str, str] = {}
    refused: set[str] = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason"):
            refused.add(params["requestId"])
    return [url for request_id, url in sent.items() if request_id not in refused]
