"""Abuse limits: per-customer rate limits on Redis (429 + Retry-After, failing open without Redis)
and a JSON parser bounded in size, depth and item count (never a 500, never deep recursion)."""

import bz2
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory

from linking.apis.links import LinkStatusApi
from merchant import throttling
from merchant.models import Customer
from merchant.parsers import JSONTooComplex, json_depth, json_loads_limited
from tests.conftest import LinkClient, link_body
from tests.processes import child_env
from workflows.models import Workflow


@pytest.fixture(autouse=True)
def throttle_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with Redis considered up; a fail-open window opened by a test closes
    with it (monkeypatch puts the old value back)."""
    monkeypatch.setattr(throttling, "_fail_open_until", 0.0)


def post(api: LinkClient, **headers: str) -> Any:
    return api.post_link(link_body(), key=str(uuid.uuid4()), **headers)


def assert_rate_limited(response: Any, *, period: int) -> int:
    assert response.status_code == 429
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "/problems/rate-limited"
    assert body["status"] == 429
    retry_after = int(response["Retry-After"])
    assert 1 <= retry_after <= period
    return retry_after


def delink(api: LinkClient, patient_id: str) -> Any:
    return api.client.delete(f"/link/{patient_id}", HTTP_CUSTOMER_TOKEN=api.token)


def patient(api: LinkClient, patient_id: str) -> Any:
    return api.client.get(f"/patient/{patient_id}", HTTP_CUSTOMER_TOKEN=api.token)


# --- rate limits ----------------------------------------------------------------------------


def test_a_customer_over_its_link_budget_gets_429_and_others_do_not(api, other_api, settings):
    settings.RATE_LIMIT_LINK_CREATE = "3/min"
    accepted = [post(api) for _ in range(3)]
    assert [r.status_code for r in accepted] == [202, 202, 202]

    refused = post(api)
    assert_rate_limited(refused, period=60)
    # The same moment: another customer (same client address) and the flooder's reads.
    assert post(other_api).status_code == 202
    assert api.status(accepted[0].json()["workflow-id"]).status_code == 200
    assert post(api).status_code == 429
    # A refused request recorded nothing: 3 of the flooder's, 1 of the other customer's.
    assert Workflow.objects.count() == 4


def test_the_limit_follows_the_token_not_the_client_address(api, settings):
    settings.RATE_LIMIT_LINK_CREATE = "2/min"
    assert post(api, REMOTE_ADDR="10.0.0.1").status_code == 202
    assert post(api, REMOTE_ADDR="10.0.0.2").status_code == 202
    assert post(api, REMOTE_ADDR="10.0.0.3").status_code == 429


def test_status_patient_and_delink_share_the_read_budget(api, other_api, settings):
    settings.RATE_LIMIT_READ = "3/min"
    unknown = str(uuid.uuid4())
    # Unknown ids: 404s, which count like any other request.
    assert api.status(unknown).status_code == 404
    assert patient(api, unknown).status_code == 404
    assert delink(api, unknown).status_code == 404
    for read in (api.status(unknown), patient(api, unknown), delink(api, unknown)):
        assert_rate_limited(read, period=60)
    # POST /link has a budget of its own; the other customer reads on.
    assert post(api).status_code == 202
    assert other_api.status(unknown).status_code == 404


def test_retry_after_is_when_the_budget_is_back(api, settings):
    settings.RATE_LIMIT_LINK_CREATE = "2/s"
    responses = [post(api) for _ in range(5)]  # 2 a window: some are refused
    refused = next(r for r in responses if r.status_code == 429)
    retry_after = assert_rate_limited(refused, period=1)
    time.sleep(retry_after)
    assert post(api).status_code == 202


def test_an_empty_rate_turns_the_limit_off(api, settings):
    settings.RATE_LIMIT_LINK_CREATE = ""
    assert all(post(api).status_code == 202 for _ in range(5))


def test_requests_without_a_token_are_not_counted(api, settings):
    settings.RATE_LIMIT_LINK_CREATE = "1/min"
    settings.RATE_LIMIT_READ = "1/min"
    anonymous = APIClient()
    for _ in range(3):
        assert anonymous.post("/link", {}, format="json").status_code == 401
        assert anonymous.get("/api/schema/").status_code == 200
    assert post(api).status_code == 202  # the customer's budget is untouched


def test_the_counter_is_exact_under_concurrency(settings, redis_db):
    """SimpleRateThrottle's read-modify-write history would let most of these through."""
    settings.RATE_LIMIT_READ = "50/min"
    customer = Customer(id=uuid.uuid4(), name="Flood Inc")
    view = LinkStatusApi()
    results: list[bool] = []
    start = threading.Barrier(20)

    def flood() -> None:
        request = Request(APIRequestFactory().get("/link/status/x"))
        request.user = customer  # type: ignore[assignment]  # our users are Customers
        start.wait()
        for _ in range(10):
            results.append(throttling.CustomerRateThrottle().allow_request(request, view))

    threads = [threading.Thread(target=flood) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Every request counted once; exactly the budget allowed in each window the run touched
    # (a window may end during the run).
    keys = redis_db.keys(f"*throttle:read:{customer.pk}:*")
    assert sum(int(redis_db.get(key)) for key in keys) == 200
    assert results.count(True) == 50 * len(keys)
    assert all(0 < redis_db.ttl(key) <= 61 for key in keys)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_without_redis_the_limit_fails_open_and_the_ack_path_answers(api, settings, caplog):
    settings.RATE_LIMIT_LINK_CREATE = "1/min"
    settings.RATE_LIMIT_READ = "1/min"
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{_closed_port()}/0",
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }
    with caplog.at_level(logging.WARNING, logger="merchant.throttling"):
        started = time.monotonic()
        responses = [post(api) for _ in range(3)]
        elapsed = time.monotonic() - started
        status = api.status(responses[0].json()["workflow-id"])
    assert [r.status_code for r in responses] == [202, 202, 202]
    assert status.status_code == 200
    assert elapsed < 3  # no request waits on the dead Redis
    warnings = [r for r in caplog.records if r.name == "merchant.throttling"]
    # One warning, then Redis is left alone for FAIL_OPEN_SECONDS.
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "Redis unavailable" in warnings[0].getMessage()


def test_after_the_fail_open_window_redis_is_tried_again(api, settings, monkeypatch):
    settings.RATE_LIMIT_LINK_CREATE = "1/min"
    monkeypatch.setattr(throttling, "_fail_open_until", time.monotonic() + 60)
    assert post(api).status_code == 202
    assert post(api).status_code == 202  # not counted: inside the window
    monkeypatch.setattr(throttling, "_fail_open_until", time.monotonic() - 1)
    assert post(api).status_code == 202
    assert post(api).status_code == 429


@pytest.mark.parametrize(
    ("rate", "parsed"),
    [("600/min", (600, 60)), ("5/s", (5, 1)), ("10/hour", (10, 3600)), ("1/day", (1, 86400))],
)
def test_rates_use_drf_syntax(rate, parsed):
    assert throttling.parse_rate(rate) == parsed


@pytest.mark.parametrize("rate", ["600", "0/min", "-1/min", "x/min", "5/fortnight", "5/"])
def test_bad_rates_are_refused(rate):
    with pytest.raises(ImproperlyConfigured):
        throttling.parse_rate(rate)


def load_settings(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; settings.INSTALLED_APPS"],
        env=child_env(DJANGO_SETTINGS_MODULE="config.settings", DEBUG="true", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("env", [{"RATE_LIMIT_READ": "600/month"}, {"RATE_LIMIT_LINK_CREATE": "x"}])
def test_bad_rate_settings_are_refused_at_start_up(env):
    result = load_settings(**env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and next(iter(env)) in result.stderr


def test_the_search_callback_is_not_throttled():
    from linking.apis.search import SearchResultCallbackApi

    assert SearchResultCallbackApi().get_throttles() == []


# --- JSON body limits -----------------------------------------------------------------------


def assert_problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"/problems/{slug}"
    return body


def nested(depth: int, inner: str = "0") -> str:
    return "[" * depth + inner + "]" * depth


def test_depth_at_the_limit_parses_and_one_more_is_refused(api):
    # {"patient": ...} is one level: 19 more make 20.
    at_limit = api.post_link('{"patient": ' + nested(19) + "}", key="a")
    assert_problem(at_limit, 400, "validation-error")  # parsed; then not a patient
    over = api.post_link('{"patient": ' + nested(20) + "}", key="b")
    body = assert_problem(over, 400, "bad-request")
    assert "nested deeper than 20 levels" in body["detail"]
    assert Workflow.objects.count() == 0


def test_deep_nesting_that_would_exhaust_the_stack_is_a_problem_not_a_500(api):
    # 32 000 levels in 64 000 bytes: json.loads alone raises RecursionError on it.
    with pytest.raises(RecursionError):
        json.loads(nested(32_000, ""))
    assert_problem(api.post_link(nested(32_000, ""), key="a"), 400, "bad-request")
    # Unclosed, and objects: the same.
    assert_problem(api.post_link("[" * 60_000, key="b"), 400, "bad-request")
    assert_problem(api.post_link('{"a":' * 12_000, key="c"), 400, "bad-request")
    # 100 000 levels is over the byte limit before any parsing.
    assert_problem(api.post_link(nested(100_000, ""), key="d"), 413, "payload-too-large")


def test_the_depth_scan_is_never_deep_itself():
    with pytest.raises(JSONTooComplex, match="deeper than 20"):
        json_loads_limited(nested(100_000))
    assert json_depth(nested(100_000), limit=20) == 21  # stops counting past the limit


def test_brackets_inside_strings_do_not_count(api):
    payer = "[{" * 30 + '\\"[[' + "}]" * 5 + "\\"  # escaped quote and backslash inside
    body = link_body(insurance={"payer": payer, "member_id": "A1"})
    assert json_depth(json.dumps(body), limit=20) == 3
    assert api.post_link(body, key="a").status_code == 202


def test_more_items_than_the_limit_are_refused(api, settings):
    # link_body has 11 members: patient; id, full_name, dob, contact, insurance; 3 + 2 inside.
    settings.JSON_MAX_ITEMS = 11
    assert api.post_link(link_body(), key="a").status_code == 202
    settings.JSON_MAX_ITEMS = 10
    body = assert_problem(api.post_link(link_body(), key="b"), 400, "bad-request")
    assert "more than 10 object members and array items" in body["detail"]


def test_a_flat_array_of_32_000_items_is_refused(api):
    payload = '{"patient": [' + ",".join(["0"] * 32_000) + "]}"
    body = assert_problem(api.post_link(payload, key="a"), 400, "bad-request")
    assert "more than 1000" in body["detail"]


def test_the_string_scan_is_linear_on_hostile_escapes(api):
    """A quadratic scanner (a regex restarting at every quote) would take minutes here."""
    for payload in ('"' + '\\"' * 30_000, '"\\"' * 20_000 + "\\", '["' * 30_000):
        started = time.monotonic()
        response = api.post_link(payload, key=str(uuid.uuid4()))
        assert time.monotonic() - started < 2
        assert response.status_code == 400
        assert response["Content-Type"] == "application/problem+json"


def test_a_compressing_charset_is_refused_not_inflated(api):
    bomb = bz2.compress(json.dumps(link_body()).encode())
    response = api.client.post(
        "/link",
        bomb,
        content_type="application/json; charset=bz2_codec",
        HTTP_CUSTOMER_TOKEN=api.token,
        HTTP_IDEMPOTENCY_KEY="k",
    )
    assert_problem(response, 400, "malformed-json")


@pytest.mark.parametrize("charset", ["utf-8", "utf-16", "latin-1"])
def test_a_declared_text_charset_is_honoured(api, charset):
    body = link_body(full_name="Zoë Müller")
    response = api.client.post(
        "/link",
        json.dumps(body, ensure_ascii=False).encode(charset),
        content_type=f"application/json; charset={charset}",
        HTTP_CUSTOMER_TOKEN=api.token,
        HTTP_IDEMPOTENCY_KEY="k",
    )
    assert response.status_code == 202, response.content


def test_a_body_that_is_not_text_in_its_charset_is_malformed(api):
    assert_problem(api.post_link(b'{"patient": "\xff\xfe"}', key="a"), 400, "malformed-json")


def test_a_body_over_djangos_backstop_is_413_not_500(api):
    """DRF has Django read the body (DATA_UPLOAD_MAX_MEMORY_SIZE, 128 KiB) before the parser."""
    body = link_body(insurance={"notes": "x" * 200_000})
    assert_problem(api.post_link(body, key="a"), 413, "payload-too-large")
    assert Workflow.objects.count() == 0


def test_redis_is_the_throttle_store(api, settings, redis_db):
    settings.RATE_LIMIT_LINK_CREATE = "5/min"
    post(api)
    post(api)
    keys = redis_db.keys("*throttle:link-create:*")
    assert len(keys) == 1 and int(redis_db.get(keys[0])) == 2
