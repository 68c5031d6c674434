"""The stand-in's liveness probe (GET /fhir/metadata) and its injected outages.

An outage scenario takes the internal system down in three ways: refused connections (the
harness stops the stand-in and later starts a new one on the same port), 503 to everything, and
hanging (requests read, never answered). Like test_standin.py, every test runs its own server on
an ephemeral 127.0.0.1 port; no database, no Django.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from standin.server import StandinServer, make_server
from tests.standin.test_standin import (
    AMBIGUOUS,
    CERTAIN,
    JANE_DOE_ID,
    call,
    control,
    match,
    parameters,
    running,
    wait_until,
)

CAPABILITY_REST = [
    {
        "mode": "server",
        "resource": [
            {
                "type": "Patient",
                "interaction": [{"code": "read"}],
                "operation": [
                    {
                        "name": "match",
                        "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match",
                    }
                ],
            }
        ],
    }
]


@pytest.fixture
def standin() -> Iterator[StandinServer]:
    with running() as server:
        yield server


def address(server: StandinServer) -> tuple[str, int]:
    host, port = server.socket.getsockname()[:2]
    return host, port


def start(port: int = 0) -> tuple[StandinServer, threading.Thread]:
    server = make_server("127.0.0.1", port)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return server, thread


def stop(server: StandinServer, thread: threading.Thread) -> None:
    """What the outage harness does to make the internal system refuse connections."""
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def raw_request(server: StandinServer, method: str, path: str, body: Any = None) -> socket.socket:
    """Send one complete HTTP/1.1 request on a fresh socket and return it unread."""
    payload = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {address(server)[0]}\r\n"
        f"Content-Type: application/fhir+json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection(address(server), timeout=5)
    sock.sendall(head.encode() + payload)
    return sock


def handler_threads() -> set[threading.Thread]:
    # socketserver names each connection's thread after its target.
    return {t for t in threading.enumerate() if "process_request_thread" in t.name}


def stats(server: StandinServer) -> dict[str, Any]:
    body: dict[str, Any] = control(server, "stats").body
    return body


# --- liveness: GET /fhir/metadata ----------------------------------------------------------


def test_metadata_is_a_capability_statement(standin: StandinServer) -> None:
    reply = call(f"{standin.base_url}/metadata")

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/fhir+json"
    statement = reply.body
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["status"] == "active"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", statement["date"])
    assert statement["kind"] == "instance"
    # FHIR invariant cpb-14: an instance's statement names its implementation.
    assert statement["implementation"]["url"] == standin.base_url
    assert statement["implementation"]["description"]
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["format"] == ["json"]
    assert statement["rest"] == CAPABILITY_REST


def test_metadata_needs_the_token_when_configured() -> None:
    with running(token="s3cret") as server:
        missing = call(f"{server.base_url}/metadata")
        wrong = call(f"{server.base_url}/metadata", headers={"Authorization": "Bearer nope"})
        right = call(f"{server.base_url}/metadata", headers={"Authorization": "Bearer s3cret"})

    assert missing.status == wrong.status == 401
    assert missing.body["issue"][0]["code"] == "login"
    assert right.status == 200
    assert right.body["resourceType"] == "CapabilityStatement"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_metadata_other_methods_are_405(standin: StandinServer, method: str) -> None:
    reply = call(f"{standin.base_url}/metadata", method, {})

    assert reply.status == 405
    assert reply.headers["Allow"] == "GET"
    assert reply.body["resourceType"] == "OperationOutcome"
    assert reply.body["issue"][0]["code"] == "not-supported"


def test_metadata_ignores_latency_failures_and_script(standin: StandinServer) -> None:
    control(standin, "config", {"latency_ms": 1000, "failure_rate": 1.0})
    control(standin, "script", {"responses": [{"status": 429, "retry_after": 1}]})

    started = time.monotonic()
    probes = [call(f"{standin.base_url}/metadata").status for _ in range(3)]
    elapsed = time.monotonic() - started
    control(standin, "config", {"latency_ms": 0})
    scripted = match(standin, CERTAIN)

    assert probes == [200, 200, 200]
    assert elapsed < 1.0  # no injected latency on any of the three
    assert scripted.status == 429  # the probes left the scripted step for the search
    counts = stats(standin)
    assert counts["metadata_calls"] == 3
    assert counts["match_calls"] == 1


# --- outage: "503" -------------------------------------------------------------------------


def test_outage_503_answers_every_fhir_path_but_not_control(standin: StandinServer) -> None:
    control(standin, "config", {"async_delay_ms": -1})
    location = match(standin, CERTAIN, headers={"Prefer": "respond-async"}).headers[
        "Content-Location"
    ]
    before = stats(standin)

    assert control(standin, "config", {"outage": "503"}).body["outage"] == "503"
    down = {
        "match": match(standin, CERTAIN),
        "async match": match(standin, AMBIGUOUS, headers={"Prefer": "respond-async"}),
        "read": call(f"{standin.base_url}/Patient/{JANE_DOE_ID}"),
        "poll": call(location),
        "metadata": call(f"{standin.base_url}/metadata"),
        "unknown path": call(f"{standin.base_url}/Observation/1"),
    }
    during = stats(standin)
    assert control(standin, "config", {"outage": ""}).body["outage"] == ""

    for name, reply in down.items():
        assert reply.status == 503, name
        assert reply.headers["Content-Type"] == "application/fhir+json", name
        assert reply.body["resourceType"] == "OperationOutcome", name
        assert reply.body["issue"][0]["code"] == "transient", name
        assert "Retry-After" not in reply.headers, name
    assert during["calls_during_outage"] == len(down)
    # By kind: the probe apart from the searches (an outage scenario bounds each).
    assert during["outage_calls"] == {"metadata": 1, "match": 2, "read": 1, "poll": 1, "other": 1}
    # The calls never reached the system's handlers, so their own counters did not move.
    for counter in ("match_calls", "read_calls", "job_polls", "metadata_calls"):
        assert during[counter] == before[counter], counter
    assert [r["status"] for r in during["requests"][-len(down) :]] == [503] * len(down)
    # Back up, with its state intact: the job made before the outage is still pending.
    assert call(f"{standin.base_url}/metadata").status == 200
    assert call(location).status == 202
    assert match(standin, CERTAIN).status == 200
    assert stats(standin)["calls_during_outage"] == len(down)


def test_outage_503_comes_before_the_token_check_and_spares_control() -> None:
    bearer = {"Authorization": "Bearer s3cret"}
    with running(token="s3cret") as server:
        assert control(server, "config", {"outage": "503"}).status == 401  # control still guarded
        control(server, "config", {"outage": "503"}, headers=bearer)

        # A system that is down cannot check tokens: everyone gets the same 503.
        anonymous = call(f"{server.base_url}/metadata")
        authorised = call(f"{server.base_url}/metadata", headers=bearer)
        counted = control(server, "stats", headers=bearer).body

    assert anonymous.status == authorised.status == 503
    assert counted["calls_during_outage"] == 2


def test_outage_does_not_consume_scripted_steps(standin: StandinServer) -> None:
    control(standin, "script", {"responses": [{"status": 500}]})
    control(standin, "config", {"outage": "503"})
    assert match(standin, CERTAIN).status == 503
    control(standin, "config", {"outage": ""})

    assert match(standin, CERTAIN).status == 500
    assert match(standin, CERTAIN).status == 200


# --- outage: "hang" ------------------------------------------------------------------------


def test_hang_times_out_the_client_until_cleared(standin: StandinServer) -> None:
    control(standin, "config", {"outage": "hang"})
    threads_before = handler_threads()
    host, port = address(standin)
    client = http.client.HTTPConnection(host, port, timeout=1)
    try:
        client.request("GET", "/fhir/metadata")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.getresponse()
        assert time.monotonic() - started >= 0.9
    finally:
        client.close()
    hung_threads = handler_threads() - threads_before

    # The control API keeps answering while a call is held.
    held = stats(standin)
    assert held["calls_hanging"] == 1
    assert held["calls_during_outage"] == 1
    assert held["outage_calls"]["metadata"] == 1  # counted on arrival, while still held
    assert control(standin, "config", {"outage": ""}).body["outage"] == ""

    assert call(f"{standin.base_url}/metadata").status == 200
    wait_until(lambda: stats(standin)["calls_hanging"] == 0)
    assert hung_threads
    for thread in hung_threads:
        thread.join(timeout=5)
        assert not thread.is_alive()
    after = stats(standin)
    assert {"method": "GET", "path": "/fhir/metadata", "status": None} in after["requests"]
    assert after["metadata_calls"] == 1  # only the answered probe
    assert after["calls_during_outage"] == 1


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/fhir/Patient/$match", parameters(CERTAIN)),
        ("GET", f"/fhir/Patient/{JANE_DOE_ID}", None),
        ("GET", f"/fhir/$match-jobs/{'0' * 32}", None),
        ("GET", "/fhir/metadata", None),
    ],
)
def test_hang_reads_the_request_and_closes_without_an_answer(
    standin: StandinServer, method: str, path: str, body: Any
) -> None:
    control(standin, "config", {"outage": "hang"})
    with raw_request(standin, method, path, body) as sock:
        # Counted on arrival, after the whole request (body included) was read.
        wait_until(lambda: stats(standin)["calls_hanging"] == 1)
        control(standin, "config", {"outage": ""})

        assert sock.recv(65536) == b""  # end of stream, not a single byte of answer


def test_hang_gives_up_after_the_maximum(
    standin: StandinServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("standin.server.HANG_MAX_SECONDS", 0.3)
    control(standin, "config", {"outage": "hang"})

    started = time.monotonic()
    with raw_request(standin, "GET", "/fhir/metadata") as sock:
        assert sock.recv(65536) == b""
    waited = time.monotonic() - started

    assert 0.25 <= waited < 3
    assert control(standin, "config", {}).body["outage"] == "hang"  # still down


def test_hang_switched_to_503_releases_held_calls(standin: StandinServer) -> None:
    control(standin, "config", {"outage": "hang"})
    with raw_request(standin, "GET", "/fhir/metadata") as sock:
        wait_until(lambda: stats(standin)["calls_hanging"] == 1)
        control(standin, "config", {"outage": "503"})
        assert sock.recv(65536) == b""

    assert call(f"{standin.base_url}/metadata").status == 503


def test_reset_zeroes_the_outage_counts(standin: StandinServer) -> None:
    control(standin, "config", {"outage": "503"})
    assert match(standin, CERTAIN).status == 503
    assert stats(standin)["outage_calls"]["match"] == 1

    control(standin, "reset")

    assert stats(standin)["outage_calls"] == dict.fromkeys(
        ("metadata", "match", "read", "poll", "other"), 0
    )


def test_reset_ends_an_outage_and_releases_held_calls(standin: StandinServer) -> None:
    control(standin, "config", {"outage": "hang"})
    with raw_request(standin, "GET", "/fhir/metadata") as sock:
        wait_until(lambda: stats(standin)["calls_hanging"] == 1)
        control(standin, "reset")
        assert sock.recv(65536) == b""

    assert control(standin, "config", {}).body["outage"] == ""
    assert call(f"{standin.base_url}/metadata").status == 200


# --- the knob ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["down", "HANG", 503, None, True, ["503"]])
def test_bad_outage_value_is_400(standin: StandinServer, value: Any) -> None:
    reply = control(standin, "config", {"outage": value})

    assert reply.status == 400
    assert "outage" in reply.body["error"]
    assert control(standin, "config", {}).body["outage"] == ""


def test_outage_at_start_up() -> None:
    with running(outage="503") as server:
        assert call(f"{server.base_url}/metadata").status == 503
        control(server, "reset")  # back to the start-up config: still down
        assert call(f"{server.base_url}/metadata").status == 503
    with pytest.raises(ValueError):
        make_server("127.0.0.1", 0, outage="down")


# --- refused connections: stop, then a new stand-in on the same port ------------------------


def test_a_stopped_stand_in_refuses_and_drops_kept_alive_connections() -> None:
    server, thread = start()
    host, port = address(server)
    kept_alive = http.client.HTTPConnection(host, port, timeout=5)
    try:
        kept_alive.request("GET", "/fhir/metadata")
        first = kept_alive.getresponse()
        first.read()
        assert first.status == 200

        stop(server, thread)

        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=5).close()
        # Without closing open connections, the stopped server's thread would answer this.
        with pytest.raises(ConnectionError):
            kept_alive.request("GET", "/fhir/metadata")
            kept_alive.getresponse().read()
    finally:
        kept_alive.close()


def test_a_new_stand_in_takes_the_port_at_once() -> None:
    first, first_thread = start()
    host, port = address(first)
    # Leave the old server with everything a real outage leaves behind: a kept-alive
    # connection, a call held by a hang and connections it closed itself (TIME_WAIT).
    for _ in range(3):
        assert call(f"{first.base_url}/Patient/{JANE_DOE_ID}").status == 200
    kept_alive = http.client.HTTPConnection(host, port, timeout=5)
    kept_alive.request("GET", "/fhir/metadata")
    kept_alive.getresponse().read()
    control(first, "config", {"outage": "hang"})
    hung = raw_request(first, "GET", "/fhir/metadata")
    wait_until(lambda: stats(first)["calls_hanging"] == 1)

    stop(first, first_thread)
    second, second_thread = start(port)  # no pause in between
    try:
        assert address(second) == (host, port)
        assert hung.recv(65536) == b""  # stopping released the held call
        assert call(f"{second.base_url}/metadata").status == 200
        assert match(second, CERTAIN).status == 200
        fresh = stats(second)
        assert fresh["match_calls"] == 1
        assert fresh["read_calls"] == 0
        assert fresh["metadata_calls"] == 1
    finally:
        hung.close()
        kept_alive.close()
        stop(second, second_thread)


def test_a_port_still_taken_is_a_clean_os_error() -> None:
    server, thread = start()
    try:
        with pytest.raises(OSError, match="in use"):
            make_server("127.0.0.1", address(server)[1])
    finally:
        stop(server, thread)
