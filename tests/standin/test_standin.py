"""Behaviour of the internal-system stand-in, exercised over real HTTP with urllib.

No database and no Django: every test starts its own server on an ephemeral 127.0.0.1 port and
shuts it down again, so tests can run in parallel and in any order.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from standin.server import StandinServer, make_server

GRADE_URL = "http://hl7.org/fhir/StructureDefinition/match-grade"
JANE_DOE_ID = "0c8eca2a00d55380a788b6f950b8c635"
RIVERA_IDS = ("bef547d80bc951c0b70792b4248204e6", "c683023a29175d0a99f8ce671ef80f99")
RIVERA_0141_ID = "c683023a29175d0a99f8ce671ef80f99"
MORGAN_ELLIS_ID = "1acea14713e756aebedffbcdaad93de0"
SAM_LINDQVIST_ID = "1a0d7d313f8b5bbd8de5d41790ad55b8"
KIM_LINDQVIST_ID = "e13b044080135896aa40c88b5c95c49b"
FAIRWEATHER_ID = "8b1da3ca44a459b7b0396528222582d8"
SECRET = "whsec_" + base64.b64encode(b"standin-test-signing-key-0123456789").decode()

# The documented example demographics (standin/README.md), one per result band.
CERTAIN = {
    "resourceType": "Patient",
    "name": [{"text": "Jane Q Doe", "family": "Doe", "given": ["Jane", "Q"]}],
    "birthDate": "1980-04-02",
    "telecom": [
        {"system": "phone", "value": "+1-555-0100"},
        {"system": "email", "value": "jane@example.org"},
    ],
    "address": [{"text": "1 Main St, Springfield"}],
}
NO_MATCH = {
    "resourceType": "Patient",
    "name": [{"family": "Nobody", "given": ["Zed"]}],
    "birthDate": "1901-01-01",
}
AMBIGUOUS = {
    "resourceType": "Patient",
    "name": [{"family": "Rivera", "given": ["Alex"]}],
    "birthDate": "1975-09-14",
}
PROBABLE = {
    "resourceType": "Patient",
    "name": [{"family": "Ellis", "given": ["Morgan"]}],
    "birthDate": "1988-07-03",
}
POSSIBLE = {
    "resourceType": "Patient",
    "name": [{"family": "Fairweather", "given": ["Rob"]}],
    "telecom": [{"system": "email", "value": "Robin.Fairweather@example.org"}],
}
TWIN = {
    "resourceType": "Patient",
    "name": [{"family": "Lindqvist", "given": ["Sam"]}],
    "birthDate": "2012-06-30",
}
HOUSEHOLD = {
    "resourceType": "Patient",
    "name": [{"family": "Lindqvist"}],
    "address": [{"text": "14 Harbor Rd, Shelbyville"}],
}


@dataclass
class Reply:
    status: int
    headers: Message
    body: Any


def call(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> Reply:
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - always a local http URL built by the test
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/fhir+json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            status, reply_headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, reply_headers, raw = exc.code, exc.headers, exc.read()
    return Reply(status, reply_headers, json.loads(raw) if raw else None)


def parameters(
    patient: dict[str, Any], count: int | None = None, only_certain: bool | None = None
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": "resource", "resource": patient}]
    if count is not None:
        params.append({"name": "count", "valueInteger": count})
    if only_certain is not None:
        params.append({"name": "onlyCertainMatches", "valueBoolean": only_certain})
    return {"resourceType": "Parameters", "parameter": params}


def match(
    server: StandinServer,
    patient: dict[str, Any],
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> Reply:
    return call(f"{server.base_url}/Patient/$match", "POST", parameters(patient, **kwargs), headers)


def control(
    server: StandinServer, action: str, body: Any = None, headers: dict[str, str] | None = None
) -> Reply:
    root = server.base_url.removesuffix("/fhir")
    method = "GET" if action == "stats" else "POST"
    return call(f"{root}/_control/{action}", method, body if body is not None else {}, headers)


def summary(bundle: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(id, grade, score) per entry, to compare result lists compactly."""
    return [
        (
            entry["resource"]["id"],
            entry["search"]["extension"][0]["valueCode"],
            entry["search"]["score"],
        )
        for entry in bundle.get("entry", [])
    ]


@contextmanager
def running(**options: Any) -> Iterator[StandinServer]:
    server = make_server("127.0.0.1", 0, **options)
    # A short poll interval keeps shutdown() (and so every test's teardown) fast.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def standin() -> Iterator[StandinServer]:
    with running() as server:
        yield server


class Receiver(ThreadingHTTPServer):
    """Plays the merchant service's callback endpoint; answers with queued statuses (else 204)."""

    daemon_threads = True

    def __init__(self, statuses: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.statuses = statuses
        self.received: queue.Queue[tuple[str, Message, bytes]] = queue.Queue()

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/internal/search-results/{{search_id}}"


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.put((self.path, self.headers, body))
        self.send_response(self.server.statuses.pop(0) if self.server.statuses else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def receiving(statuses: list[int] | None = None) -> Iterator[Receiver]:
    receiver = Receiver(statuses or [])
    thread = threading.Thread(target=receiver.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(timeout=5)


def expected_signature(secret: str, headers: Message, body: bytes) -> str:
    """Standard Webhooks v1 signature, computed independently of the stand-in's code."""
    key = base64.b64decode(secret.split("_", 1)[1])
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body.decode()}"
    digest = hmac.new(key, content.encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- $match bands --------------------------------------------------------------------------


def test_certain_example_returns_exactly_one_certain_match(standin: StandinServer) -> None:
    reply = match(standin, CERTAIN, count=5, only_certain=False)

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/fhir+json"
    assert reply.body["resourceType"] == "Bundle"
    assert reply.body["type"] == "searchset"
    assert reply.body["total"] == 1
    (entry,) = reply.body["entry"]
    assert entry["fullUrl"] == f"{standin.base_url}/Patient/{JANE_DOE_ID}"
    assert entry["resource"]["resourceType"] == "Patient"
    assert entry["resource"]["id"] == JANE_DOE_ID
    assert entry["search"] == {
        "mode": "match",
        "score": 0.99,  # 0.97 plus phone and email agreement
        "extension": [{"url": GRADE_URL, "valueCode": "certain"}],
    }


def test_certain_without_contact_details_scores_base(standin: StandinServer) -> None:
    patient = {k: v for k, v in CERTAIN.items() if k not in ("telecom", "address")}
    assert summary(match(standin, patient).body) == [(JANE_DOE_ID, "certain", 0.97)]


def test_no_match_is_an_empty_searchset(standin: StandinServer) -> None:
    reply = match(standin, NO_MATCH)

    assert reply.status == 200
    assert reply.body == {"resourceType": "Bundle", "type": "searchset", "total": 0}


def test_ambiguous_example_returns_two_close_certain_candidates(standin: StandinServer) -> None:
    reply = match(standin, AMBIGUOUS)

    # Equal scores, so the tie is broken by ascending patient id.
    assert summary(reply.body) == [
        (RIVERA_IDS[0], "certain", 0.97),
        (RIVERA_IDS[1], "certain", 0.97),
    ]


def test_ambiguous_phone_agreement_only_nudges_the_score(standin: StandinServer) -> None:
    patient = {**AMBIGUOUS, "telecom": [{"system": "phone", "value": "555 0141"}]}

    assert summary(match(standin, patient).body) == [
        (RIVERA_0141_ID, "certain", 0.98),
        (RIVERA_IDS[0], "certain", 0.97),
    ]


def test_probable_example_swapped_month_and_day(standin: StandinServer) -> None:
    assert summary(match(standin, PROBABLE).body) == [(MORGAN_ELLIS_ID, "probable", 0.82)]


def test_probable_birth_date_one_day_off(standin: StandinServer) -> None:
    patient = {**PROBABLE, "birthDate": "1988-03-08"}
    assert summary(match(standin, patient).body) == [(MORGAN_ELLIS_ID, "probable", 0.82)]


def test_possible_family_plus_email(standin: StandinServer) -> None:
    assert summary(match(standin, POSSIBLE).body) == [(FAIRWEATHER_ID, "possible", 0.56)]


def test_twin_query_returns_certain_twin_then_probable_sibling(standin: StandinServer) -> None:
    assert summary(match(standin, TWIN).body) == [
        (SAM_LINDQVIST_ID, "certain", 0.97),
        (KIM_LINDQVIST_ID, "probable", 0.82),
    ]


@pytest.mark.parametrize(
    ("name", "birth_date"),
    [
        ({"text": "JOSE NUNEZ"}, "1972-05-18"),
        ({"family": "nunez", "given": ["José"]}, "1972-05-18"),
        ({"family": "OBRIEN", "given": ["Mary Ann"]}, "1969-08-23"),
        ({"text": "  mary-ann   o'brien "}, "1969-08-23"),
    ],
)
def test_names_are_normalised(
    standin: StandinServer, name: dict[str, Any], birth_date: str
) -> None:
    patient = {"resourceType": "Patient", "name": [name], "birthDate": birth_date}
    grades = [grade for _, grade, _ in summary(match(standin, patient).body)]
    assert grades == ["certain"]


def test_count_limits_entries_and_keeps_order(standin: StandinServer) -> None:
    everyone = summary(match(standin, HOUSEHOLD, count=10).body)
    assert len(everyone) == 4
    assert {grade for _, grade, _ in everyone} == {"possible"}
    assert [pid for pid, _, _ in everyone] == sorted(pid for pid, _, _ in everyone)

    limited = match(standin, HOUSEHOLD, count=2).body
    assert limited["total"] == 2
    assert summary(limited) == everyone[:2]


def test_only_certain_matches_filters_lower_grades(standin: StandinServer) -> None:
    assert summary(match(standin, TWIN, only_certain=True).body) == [
        (SAM_LINDQVIST_ID, "certain", 0.97)
    ]
    assert match(standin, PROBABLE, only_certain=True).body["total"] == 0


def test_scores_are_stable_across_calls_and_servers(standin: StandinServer) -> None:
    first = match(standin, HOUSEHOLD).body
    assert match(standin, HOUSEHOLD).body == first
    with running() as other:
        assert summary(match(other, HOUSEHOLD).body) == summary(first)


@pytest.mark.parametrize(
    ("body", "diagnostic"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "Parameters"),
        ({"resourceType": "Patient"}, "Parameters"),
        ({"resourceType": "Parameters"}, "parameter"),
        ({"resourceType": "Parameters", "parameter": []}, "resource"),
        (
            {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {}}]},
            "Patient",
        ),
        (parameters(CERTAIN, count=0), "count"),
        (parameters({**CERTAIN, "name": "Jane Doe"}), "Patient.name"),
        (parameters({**CERTAIN, "birthDate": "02/04/1980"}), "birthDate"),
        (parameters({**CERTAIN, "telecom": [{"system": "phone", "value": 5550100}]}), "telecom"),
        (
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "resource", "resource": CERTAIN},
                    {"name": "onlyCertainMatches", "valueBoolean": "yes"},
                ],
            },
            "onlyCertainMatches",
        ),
    ],
)
def test_invalid_body_is_400_operation_outcome(
    standin: StandinServer, body: Any, diagnostic: str
) -> None:
    reply = call(f"{standin.base_url}/Patient/$match", "POST", body)

    assert reply.status == 400
    assert reply.headers["Content-Type"] == "application/fhir+json"
    assert reply.body["resourceType"] == "OperationOutcome"
    (issue,) = reply.body["issue"]
    assert issue["severity"] == "error"
    assert issue["code"] == "invalid"
    assert diagnostic in issue["diagnostics"]


# --- read ----------------------------------------------------------------------------------


def test_read_returns_full_patient(standin: StandinServer) -> None:
    reply = call(f"{standin.base_url}/Patient/{JANE_DOE_ID}")

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/fhir+json"
    patient = reply.body
    assert patient["resourceType"] == "Patient"
    assert patient["id"] == JANE_DOE_ID
    assert patient["name"][0] == {
        "use": "official",
        "text": "Jane Q Doe",
        "family": "Doe",
        "given": ["Jane", "Q"],
    }
    assert patient["birthDate"] == "1980-04-02"
    assert patient["gender"] == "female"
    assert {"system": "phone", "value": "+1-555-0100", "use": "home"} in patient["telecom"]
    assert set(patient["address"][0]) >= {"line", "city", "postalCode", "country", "text"}
    assert patient["identifier"] == [{"system": "urn:standin:mrn", "value": "SYN-0001"}]


def test_read_unknown_patient_is_404(standin: StandinServer) -> None:
    reply = call(f"{standin.base_url}/Patient/does-not-exist")

    assert reply.status == 404
    assert reply.body["resourceType"] == "OperationOutcome"
    assert reply.body["issue"][0]["code"] == "not-found"


def test_every_match_result_can_be_read_back(standin: StandinServer) -> None:
    for entry in match(standin, HOUSEHOLD).body["entry"]:
        assert call(entry["fullUrl"]).body == entry["resource"]


# --- auth ----------------------------------------------------------------------------------


def test_token_is_required_when_configured() -> None:
    with running(token="s3cret") as server:
        missing = match(server, CERTAIN)
        wrong = match(server, CERTAIN, headers={"Authorization": "Bearer nope"})
        right = match(server, CERTAIN, headers={"Authorization": "Bearer s3cret"})
        read = call(f"{server.base_url}/Patient/{JANE_DOE_ID}")
        stats = control(server, "stats")
        stats_ok = control(server, "stats", headers={"Authorization": "Bearer s3cret"})

    assert missing.status == wrong.status == read.status == stats.status == 401
    assert missing.body["resourceType"] == "OperationOutcome"
    assert missing.body["issue"][0]["code"] == "login"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert right.status == 200
    assert stats_ok.status == 200
    # Rejected calls never reach the $match handler.
    assert stats_ok.body["match_calls"] == 1


def test_no_token_configured_means_no_auth(standin: StandinServer) -> None:
    assert match(standin, CERTAIN).status == 200
    assert match(standin, CERTAIN, headers={"Authorization": "Bearer anything"}).status == 200


# --- async ---------------------------------------------------------------------------------


def test_async_job_is_pending_until_completed(standin: StandinServer) -> None:
    control(standin, "config", {"async_delay_ms": -1})
    sync_bundle = match(standin, AMBIGUOUS).body

    accepted = match(standin, AMBIGUOUS, headers={"Prefer": "respond-async"})

    assert accepted.status == 202
    location = accepted.headers["Content-Location"]
    assert re.fullmatch(re.escape(standin.base_url) + r"/\$match-jobs/[0-9a-f]{32}", location)
    pending = call(location)
    assert pending.status == 202
    assert pending.body["resourceType"] == "OperationOutcome"
    assert control(standin, "complete-jobs").body == {"completed": 1}
    done = call(location)
    assert done.status == 200
    assert done.body == sync_bundle
    assert control(standin, "stats").body["job_polls"] == 2


def test_async_job_completes_after_configured_delay() -> None:
    with running(async_delay_ms=300) as server:
        location = match(server, CERTAIN, headers={"Prefer": "respond-async"}).headers[
            "Content-Location"
        ]
        assert call(location).status == 202
        wait_until(lambda: call(location).status == 200)


def test_async_job_with_default_delay_is_done_at_first_poll(standin: StandinServer) -> None:
    accepted = match(standin, CERTAIN, headers={"Prefer": "return=minimal, respond-async"})

    done = call(accepted.headers["Content-Location"])
    assert done.status == 200
    assert summary(done.body) == [(JANE_DOE_ID, "certain", 0.99)]


def test_unknown_job_is_404(standin: StandinServer) -> None:
    reply = call(f"{standin.base_url}/$match-jobs/{'0' * 32}")

    assert reply.status == 404
    assert reply.body["resourceType"] == "OperationOutcome"


def test_callback_is_delivered_with_valid_signature() -> None:
    with (
        receiving() as receiver,
        running(
            callback_url=receiver.url_template, callback_secret=SECRET, async_delay_ms=-1
        ) as server,
    ):
        location = match(server, AMBIGUOUS, headers={"Prefer": "respond-async"}).headers[
            "Content-Location"
        ]
        search_id = location.rsplit("/", 1)[1]
        assert receiver.received.empty()  # nothing is sent while the job is pending
        control(server, "complete-jobs")
        path, headers, body = receiver.received.get(timeout=5)
        wait_until(lambda: control(server, "stats").body["callbacks_sent"] == 1)
        polled = call(location).body

    assert path == f"/internal/search-results/{search_id}"
    assert headers["Content-Type"] == "application/fhir+json"
    assert re.fullmatch(r"msg_[0-9a-f]{32}", headers["webhook-id"])
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert headers["webhook-signature"] == expected_signature(SECRET, headers, body)
    assert json.loads(body) == polled
    assert len(polled["entry"]) == 2


def test_failed_callback_is_retried_with_the_same_message_id() -> None:
    with (
        receiving(statuses=[500]) as receiver,
        running(callback_url=receiver.url_template, callback_secret=SECRET) as server,
    ):
        match(server, CERTAIN, headers={"Prefer": "respond-async"})
        _, first_headers, first_body = receiver.received.get(timeout=5)
        _, second_headers, second_body = receiver.received.get(timeout=5)
        wait_until(lambda: control(server, "stats").body["callbacks_sent"] == 1)
        stats = control(server, "stats").body

    assert first_headers["webhook-id"] == second_headers["webhook-id"]
    assert first_body == second_body
    assert second_headers["webhook-signature"] == expected_signature(
        SECRET, second_headers, second_body
    )
    assert stats["callback_failures"] == 1
    assert receiver.received.empty()


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("http://127.0.0.1:1/cb/{search_id}", None),
        ("http://127.0.0.1:1/cb/no-placeholder", SECRET),
        ("file:///tmp/{search_id}", SECRET),
        ("http://127.0.0.1:1/cb/{search_id}", "not-a-whsec-secret"),
        ("http://127.0.0.1:1/cb/{search_id}", "whsec_***"),
    ],
)
def test_bad_callback_configuration_fails_at_start(url: str, secret: str | None) -> None:
    with pytest.raises(ValueError):
        make_server("127.0.0.1", 0, callback_url=url, callback_secret=secret)


# --- knobs and control API -----------------------------------------------------------------


def test_scripted_responses_are_consumed_in_order(standin: StandinServer) -> None:
    script = {
        "responses": [
            {"status": 500},
            {"status": 429, "retry_after": 1},
            {"status": 400},
            {"delay_ms": 300},
            {"status": 200},
        ]
    }
    assert control(standin, "script", script).body == {"queued": 5}

    server_error = match(standin, CERTAIN)
    throttled = match(standin, CERTAIN)
    bad_request = match(standin, CERTAIN)
    started = time.monotonic()
    delayed = match(standin, CERTAIN)
    delay = time.monotonic() - started
    scripted_ok = match(standin, CERTAIN)
    after_script = match(standin, CERTAIN)

    assert server_error.status == 500
    assert server_error.body["resourceType"] == "OperationOutcome"
    assert throttled.status == 429
    assert throttled.headers["Retry-After"] == "1"
    assert throttled.body["issue"][0]["code"] == "throttled"
    assert bad_request.status == 400
    assert bad_request.body["resourceType"] == "OperationOutcome"
    assert delayed.status == 200
    assert delay >= 0.3
    assert summary(delayed.body) == [(JANE_DOE_ID, "certain", 0.99)]
    assert scripted_ok.status == after_script.status == 200
    assert control(standin, "stats").body["match_calls"] == 6


@pytest.mark.parametrize(
    "step",
    [{"status": 302}, {"status": "500"}, {"delay_ms": -1}, {"retry_after": "soon"}, {"colour": 1}],
)
def test_invalid_script_is_rejected(standin: StandinServer, step: dict[str, Any]) -> None:
    reply = control(standin, "script", {"responses": [step]})

    assert reply.status == 400
    assert "error" in reply.body
    assert match(standin, CERTAIN).status == 200  # nothing was queued


def statuses(server: StandinServer, calls: int) -> list[int]:
    return [match(server, CERTAIN).status for _ in range(calls)]


def test_failure_rate_is_deterministic_for_a_seed() -> None:
    with running(failure_rate=0.5, seed=7) as first, running(failure_rate=0.5, seed=7) as second:
        sequence = statuses(first, 20)
        assert statuses(second, 20) == sequence
        control(first, "reset")
        assert statuses(first, 20) == sequence
    with running(failure_rate=0.5, seed=8) as other_seed:
        assert statuses(other_seed, 20) != sequence
    assert set(sequence) == {200, 500}


def test_failure_rate_can_be_changed_at_runtime(standin: StandinServer) -> None:
    assert control(standin, "config", {"failure_rate": 1.0}).body["failure_rate"] == 1.0
    assert statuses(standin, 3) == [500, 500, 500]
    control(standin, "reset")
    assert statuses(standin, 3) == [200, 200, 200]


def test_latency_delays_match_and_polls(standin: StandinServer) -> None:
    control(standin, "config", {"latency_ms": 200})

    started = time.monotonic()
    location = match(standin, CERTAIN, headers={"Prefer": "respond-async"}).headers[
        "Content-Location"
    ]
    call(location)

    assert time.monotonic() - started >= 0.4


def test_family_latency_slows_only_that_family(standin: StandinServer) -> None:
    reply = control(standin, "config", {"family_latency_ms": {"Nobody": 400}})
    assert reply.body["family_latency_ms"] == {"nobody": 400}  # normalised as for scoring

    started = time.monotonic()
    slow = match(standin, {**NO_MATCH, "name": [{"family": "NOBODY", "given": ["Zed"]}]})
    slow_took = time.monotonic() - started
    started = time.monotonic()
    quick = match(standin, CERTAIN)
    quick_took = time.monotonic() - started

    assert slow.status == 200 and slow.body["total"] == 0
    assert quick.status == 200 and summary(quick.body)[0][0] == JANE_DOE_ID
    assert slow_took >= 0.4
    assert quick_took < 0.3
    assert control(standin, "config", {"family_latency_ms": {}}).body["family_latency_ms"] == {}
    started = time.monotonic()
    match(standin, NO_MATCH)
    assert time.monotonic() - started < 0.3


def test_family_latency_keeps_names_out_of_the_log(
    standin: StandinServer, capfd: pytest.CaptureFixture[str]
) -> None:
    control(standin, "config", {"family_latency_ms": {"Nobody": 50}})

    assert match(standin, NO_MATCH).status == 200

    logged = capfd.readouterr().err
    assert "standin: POST /fhir/Patient/$match 200" in logged
    assert "obody" not in logged.lower()
    assert "Zed" not in logged


@pytest.mark.parametrize(
    "body",
    [
        {"latency_ms": -5},
        {"latency_ms": "1"},
        {"failure_rate": 2},
        {"unknown": 1},
        ["x"],
        {"family_latency_ms": ["Nobody"]},
        {"family_latency_ms": {"Nobody": -1}},
        {"family_latency_ms": {"Nobody": "1000"}},
        {"family_latency_ms": {"Nobody": True}},
        {"family_latency_ms": {"--": 100}},
    ],
)
def test_invalid_config_is_rejected(standin: StandinServer, body: Any) -> None:
    reply = control(standin, "config", body)

    assert reply.status == 400
    assert "error" in reply.body


def test_stats_count_calls_and_reset_clears_them(standin: StandinServer) -> None:
    match(standin, CERTAIN)
    match(standin, NO_MATCH)
    call(f"{standin.base_url}/Patient/{JANE_DOE_ID}")
    call(f"{standin.base_url}/Patient/unknown")
    call(f"{standin.base_url}/$match-jobs/{'a' * 32}")
    control(standin, "config", {"latency_ms": 10})

    stats = control(standin, "stats").body

    assert stats["match_calls"] == 2
    assert stats["read_calls"] == 2
    assert stats["job_polls"] == 1
    assert stats["callbacks_sent"] == 0
    assert stats["requests"] == [
        {"method": "POST", "path": "/fhir/Patient/$match", "status": 200},
        {"method": "POST", "path": "/fhir/Patient/$match", "status": 200},
        {"method": "GET", "path": f"/fhir/Patient/{JANE_DOE_ID}", "status": 200},
        {"method": "GET", "path": "/fhir/Patient/unknown", "status": 404},
        {"method": "GET", "path": f"/fhir/$match-jobs/{'a' * 32}", "status": 404},
    ]

    assert control(standin, "reset").status == 200
    cleared = control(standin, "stats").body
    assert cleared["match_calls"] == cleared["read_calls"] == cleared["job_polls"] == 0
    assert cleared["requests"] == []
    assert control(standin, "config", {}).body == {
        "latency_ms": 0,
        "failure_rate": 0.0,
        "async_delay_ms": 0,
        "outage": "",
        "family_latency_ms": {},
    }


def test_request_log_keeps_the_last_200(standin: StandinServer) -> None:
    for _ in range(205):
        call(f"{standin.base_url}/Patient/{JANE_DOE_ID}")

    stats = control(standin, "stats").body
    assert stats["read_calls"] == 205
    assert len(stats["requests"]) == 200


def test_reset_forgets_jobs_and_script(standin: StandinServer) -> None:
    control(standin, "config", {"async_delay_ms": -1})
    location = match(standin, CERTAIN, headers={"Prefer": "respond-async"}).headers[
        "Content-Location"
    ]
    control(standin, "script", {"responses": [{"status": 503}]})

    control(standin, "reset")

    assert call(location).status == 404
    assert match(standin, CERTAIN).status == 200


# --- protocol hygiene ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/fhir/Observation/1", 404),
        ("GET", "/elsewhere", 404),
        ("GET", "/fhir/Patient", 404),
        ("GET", "/fhir/Patient/$match", 405),
        ("DELETE", f"/fhir/Patient/{JANE_DOE_ID}", 405),
    ],
)
def test_unknown_paths_and_methods(
    standin: StandinServer, method: str, path: str, status: int
) -> None:
    root = standin.base_url.removesuffix("/fhir")
    reply = call(f"{root}{path}", method)

    assert reply.status == status
    assert reply.headers["Content-Type"] == "application/fhir+json"
    assert reply.body["resourceType"] == "OperationOutcome"


def test_unknown_control_action_is_404(standin: StandinServer) -> None:
    assert control(standin, "explode").status == 404


def test_log_lines_carry_no_patient_data(
    standin: StandinServer, capfd: pytest.CaptureFixture[str]
) -> None:
    match(standin, CERTAIN)
    call(f"{standin.base_url}/Patient/$match", "POST", b'{"secret": "Jane Doe 1980-04-02"')

    err = capfd.readouterr().err
    assert re.search(r"^standin: POST /fhir/Patient/\$match 200 \d+ms$", err, re.MULTILINE)
    assert "POST /fhir/Patient/$match 400" in err
    for fragment in ("Doe", "Jane", "1980", "555", "example.org", "Main St"):
        assert fragment not in err


def cli_env() -> dict[str, str]:
    """The caller's environment minus STANDIN_* settings, which would change the behaviour."""
    return {key: value for key, value in os.environ.items() if not key.startswith("STANDIN_")}


def test_command_line_prints_address_and_serves() -> None:
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-m", "standin", "--host", "127.0.0.1", "--port", "0", "--seed", "3"],
        cwd=root,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        found = re.fullmatch(r"standin listening on (http://127\.0\.0\.1:(\d+)/fhir)", line)
        assert found, line
        assert int(found.group(2)) > 0
        reply = call(f"{found.group(1)}/Patient/$match", "POST", parameters(CERTAIN))
        assert summary(reply.body) == [(JANE_DOE_ID, "certain", 0.99)]
    finally:
        process.terminate()
        process.wait(timeout=5)
    assert process.returncode == 0  # SIGTERM is a clean shutdown


def test_custom_data_file_is_served(tmp_path: Path) -> None:
    data = tmp_path / "patients.json"
    data.write_text(json.dumps({"patients": [{**CERTAIN, "id": "only-one"}]}))

    with running(data_path=data) as server:
        assert summary(match(server, CERTAIN).body) == [("only-one", "certain", 0.99)]
        assert match(server, AMBIGUOUS).body["total"] == 0


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"patients": [{"resourceType": "Patient"}]},
        {"patients": [{**CERTAIN, "id": "x"}, {**CERTAIN, "id": "x"}]},
        {"patients": [{**CERTAIN, "id": "x", "birthDate": "yesterday"}]},
    ],
)
def test_broken_data_file_fails_at_start(tmp_path: Path, document: Any) -> None:
    data = tmp_path / "patients.json"
    data.write_text(json.dumps(document))

    with pytest.raises(ValueError):
        make_server("127.0.0.1", 0, data_path=data)


def test_command_line_rejects_half_configured_callback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "standin", "--port", "0", "--callback-url", "http://x/{search_id}"],
        cwd=Path(__file__).resolve().parents[2],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )

    assert result.returncode == 2
    assert "callback URL and callback secret must be configured together" in result.stderr
