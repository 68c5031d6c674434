"""The FHIR `Patient/$match` client (docs/internal-search-contract.md): the request body it builds,
how it reads a searchset Bundle, and how every kind of answer of a real server is classified
(permanent or transient), against the stand-in on an ephemeral 127.0.0.1 port."""

import copy
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from urllib3.exceptions import NewConnectionError

from linking.internal_search import (
    MATCH_GRADE_URL,
    Candidate,
    InternalSearchError,
    internal_search_match,
    match_parameters,
    parse_bundle,
)
from standin.server import StandinServer, make_server
from tests.conftest import link_body
from tests.processes import free_port, serving

JANE_DOE_ID = "0c8eca2a00d55380a788b6f950b8c635"
RIVERA_IDS = ["bef547d80bc951c0b70792b4248204e6", "c683023a29175d0a99f8ce671ef80f99"]
MORGAN_ELLIS_ID = "1acea14713e756aebedffbcdaad93de0"
CONTRACT_ELEMENTS = {"resourceType", "name", "birthDate", "telecom", "address"}


def patient(**overrides: Any) -> dict[str, Any]:
    """A patient as stored in the request data (what the consumer hands to the client)."""
    data: dict[str, Any] = link_body(**overrides)["patient"]
    return data


def resource_of(parameters: dict[str, Any]) -> dict[str, Any]:
    by_name = {p["name"]: p for p in parameters["parameter"]}
    resource: dict[str, Any] = by_name["resource"]["resource"]
    return resource


def empty_values(value: Any, path: str = "$") -> list[str]:
    """Paths of every empty list, dict, string or null anywhere in a JSON document."""
    if value in ([], {}, "", None):
        return [path]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in empty_values(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in empty_values(item, f"{path}[{i}]")]
    return []


# --- match_parameters ----------------------------------------------------------------------------


def test_parameters_of_a_full_patient():
    params = match_parameters(patient(), count=5)
    assert params["resourceType"] == "Parameters"
    by_name = {p["name"]: p for p in params["parameter"]}
    assert set(by_name) == {"resource", "count", "onlyCertainMatches"}
    assert by_name["count"] == {"name": "count", "valueInteger": 5}
    assert by_name["onlyCertainMatches"] == {"name": "onlyCertainMatches", "valueBoolean": False}
    assert by_name["resource"]["resource"] == {
        "resourceType": "Patient",
        "name": [{"text": "Jane Q Doe", "family": "Doe", "given": ["Jane", "Q"]}],
        "birthDate": "1980-04-02",
        "telecom": [
            {"system": "phone", "value": "+1-555-0100"},
            {"system": "email", "value": "jane@example.org"},
        ],
        "address": [{"text": "1 Main St, Springfield"}],
    }


def test_count_is_the_one_asked_for():
    by_name = {p["name"]: p for p in match_parameters(patient(), count=17)["parameter"]}
    assert by_name["count"]["valueInteger"] == 17


@pytest.mark.parametrize(
    ("full_name", "expected"),
    [
        ("Jane Doe", {"text": "Jane Doe", "family": "Doe", "given": ["Jane"]}),
        (
            "Mary Ann  van Dyke",
            {"text": "Mary Ann van Dyke", "family": "Dyke", "given": ["Mary", "Ann", "van"]},
        ),
        ("  José   Núñez ", {"text": "José Núñez", "family": "Núñez", "given": ["José"]}),
        # One word is a family name; `given` is left out rather than sent empty.
        ("Cher", {"text": "Cher", "family": "Cher"}),
    ],
)
def test_name_is_split_into_family_and_given(full_name, expected):
    resource = resource_of(match_parameters(patient(full_name=full_name), count=5))
    assert resource["name"] == [expected]


@pytest.mark.parametrize(
    ("contact", "present"),
    [
        (None, set()),
        ({}, set()),
        ({"phone": "+1-555-0100"}, {"phone"}),
        ({"email": "jane@example.org"}, {"email"}),
        ({"address": "1 Main St, Springfield"}, {"address"}),
        ({"phone": "", "email": "", "address": ""}, set()),
        ({"phone": "+1-555-0100", "address": "1 Main St"}, {"phone", "address"}),
    ],
)
def test_elements_not_sent_by_the_customer_are_left_out(contact, present):
    data = patient()
    if contact is None:
        del data["contact"]
    else:
        data["contact"] = contact
    params = match_parameters(data, count=5)
    resource = resource_of(params)
    assert empty_values(params) == []
    systems = {t["system"] for t in resource.get("telecom", [])}
    assert systems == present & {"phone", "email"}
    assert ("telecom" in resource) == bool(systems)
    assert ("address" in resource) == ("address" in present)
    assert set(resource) <= CONTRACT_ELEMENTS


def test_customer_patient_id_and_other_fields_are_never_sent():
    canary_id = str(uuid.uuid4())
    data = patient(id=canary_id, insurance={"payer": "Canary Mutual", "member_id": "ZX-991"})
    body = json.dumps(match_parameters(data, count=5))
    for secret in (canary_id, canary_id.replace("-", ""), "Canary Mutual", "ZX-991"):
        assert secret not in body
    assert set(resource_of(json.loads(body))) <= CONTRACT_ELEMENTS


def test_parameters_do_not_change_the_patient():
    data = patient()
    before = copy.deepcopy(data)
    match_parameters(data, count=5)
    assert data == before


# --- parse_bundle --------------------------------------------------------------------------------


def entry(patient_id: Any, score: Any = 0.9, grade: str | None = "certain") -> dict[str, Any]:
    search: dict[str, Any] = {"mode": "match", "score": score}
    if grade is not None:
        search["extension"] = [{"url": MATCH_GRADE_URL, "valueCode": grade}]
    return {
        "fullUrl": f"http://internal.example/fhir/Patient/{patient_id}",
        "resource": {"resourceType": "Patient", "id": patient_id},
        "search": search,
    }


def bundle(*entries: dict[str, Any]) -> dict[str, Any]:
    document: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries),
    }
    if entries:
        document["entry"] = list(entries)
    return document


def test_bundle_without_entries_is_no_candidates():
    assert parse_bundle(bundle()) == []
    assert parse_bundle({"resourceType": "Bundle", "type": "searchset", "entry": []}) == []


def test_candidates_come_best_first_with_their_grades():
    parsed = parse_bundle(
        bundle(
            entry("low", 0.56, "possible"),
            entry("top", 0.97, "certain"),
            entry("mid", 0.82, "probable"),
        )
    )
    assert parsed == [
        Candidate("top", 0.97, "certain"),
        Candidate("mid", 0.82, "probable"),
        Candidate("low", 0.56, "possible"),
    ]


def test_equal_scores_keep_the_servers_order():
    parsed = parse_bundle(bundle(entry("b", 0.97), entry("a", 0.97), entry("c", 0.99)))
    assert [c.internal_patient_id for c in parsed] == ["c", "b", "a"]


def test_certainly_not_candidates_are_dropped():
    parsed = parse_bundle(bundle(entry("no", 0.99, "certainly-not"), entry("yes", 0.6, "possible")))
    assert [c.internal_patient_id for c in parsed] == ["yes"]


def test_integer_scores_and_bounds_are_accepted():
    parsed = parse_bundle(bundle(entry("one", 1), entry("zero", 0, "possible")))
    assert [(c.internal_patient_id, c.score) for c in parsed] == [("one", 1.0), ("zero", 0.0)]
    assert all(isinstance(c.score, float) for c in parsed)


NOT_A_BUNDLE: list[Any] = [
    None,
    [],
    "Bundle",
    {"resourceType": "OperationOutcome", "issue": []},
    {"resourceType": "Bundle", "type": "batch-response", "entry": []},
    {"resourceType": "Bundle", "entry": []},
    {"resourceType": "Bundle", "type": "searchset", "entry": {"resource": {}}},
    bundle({**entry("x"), "resource": {"resourceType": "Observation", "id": "x"}}),
    bundle(entry(42)),
    bundle(entry(None)),
    bundle(entry("x", 1.01)),
    bundle(entry("x", -0.1)),
    bundle(entry("x", "0.9")),
    bundle(entry("x", True)),
    bundle(entry("x", None)),
    bundle(entry("x", 0.9, "likely")),
    bundle(entry("ok", 0.99), entry("x", 0.5, "CERTAIN")),
]


@pytest.mark.parametrize("document", NOT_A_BUNDLE)
def test_invalid_bundles_are_refused(document):
    with pytest.raises(ValueError):
        parse_bundle(document)


@pytest.mark.parametrize(
    "document",
    [
        bundle({"resource": {"resourceType": "Patient"}, "search": {"score": 0.9}}),
        bundle({"search": {"score": 0.9}}),
    ],
    ids=["resource-without-id", "entry-without-resource"],
)
def test_entry_without_id_is_a_value_error(document):
    with pytest.raises(ValueError):
        parse_bundle(document)


@pytest.mark.parametrize(
    "document",
    [
        bundle({"resource": {"resourceType": "Patient", "id": "x"}, "search": "match"}),
        bundle(
            {"resource": {"resourceType": "Patient", "id": "x"}, "search": {"extension": ["x"]}}
        ),
    ],
    ids=["search-is-a-string", "extension-is-a-list-of-strings"],
)
def test_malformed_search_element_is_a_value_error(document):
    with pytest.raises(ValueError):
        parse_bundle(document)


def test_overlong_internal_id_is_refused_not_truncated():
    long_id = "a" * 64 + "b"
    with pytest.raises(ValueError):
        parse_bundle(bundle(entry(long_id)))


# --- internal_search_match against the stand-in ------------------------------------------------


@pytest.fixture
def standin(settings: Any) -> Iterator[StandinServer]:
    server = make_server("127.0.0.1", 0)
    settings.INTERNAL_SEARCH_URL = server.base_url
    settings.INTERNAL_SEARCH_TOKEN = ""
    settings.INTERNAL_SEARCH_READ_TIMEOUT = 2.0
    settings.INTERNAL_SEARCH_CONNECT_TIMEOUT = 1.0
    with serving(server):
        yield server


def control(server: StandinServer, action: str, body: Any = None) -> Any:
    root = server.base_url.removesuffix("/fhir")
    token = server.state.token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if action == "stats":
        response = requests.get(f"{root}/_control/stats", headers=headers, timeout=5)
    else:
        response = requests.post(
            f"{root}/_control/{action}", json=body or {}, headers=headers, timeout=5
        )
    response.raise_for_status()
    return response.json()


def script(server: StandinServer, *steps: dict[str, int]) -> None:
    control(server, "script", {"responses": list(steps)})


def test_certain_match_returns_the_internal_id(standin):
    candidates = internal_search_match(patient())
    assert candidates == [Candidate(JANE_DOE_ID, 0.99, "certain")]
    requests_seen = control(standin, "stats")["requests"]
    assert requests_seen == [{"method": "POST", "path": "/fhir/Patient/$match", "status": 200}]


def test_no_match_is_an_empty_list(standin):
    assert internal_search_match(patient(full_name="Zed Nobody", dob="1901-01-01")) == []


def test_ambiguous_and_probable_results_come_back_graded(standin):
    rivera = patient(full_name="Alex Rivera", dob="1975-09-14")
    del rivera["contact"]
    assert internal_search_match(rivera) == [
        Candidate(RIVERA_IDS[0], 0.97, "certain"),
        Candidate(RIVERA_IDS[1], 0.97, "certain"),
    ]
    ellis = patient(full_name="Morgan Ellis", dob="1988-07-03")
    del ellis["contact"]
    assert internal_search_match(ellis) == [Candidate(MORGAN_ELLIS_ID, 0.82, "probable")]


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_server_errors_are_transient(standin, status):
    script(standin, {"status": status})
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is False
    assert caught.value.retry_after is None
    assert str(status) in caught.value.reason
    # The next call is answered normally: the error was that one answer, not the client.
    answer = internal_search_match(patient())
    assert isinstance(answer, list)
    assert answer[0].internal_patient_id == JANE_DOE_ID


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_passed_on(standin, status):
    script(standin, {"status": status, "retry_after": 7})
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is False
    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_other_client_errors_are_permanent(standin, status):
    script(standin, {"status": status})
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is True
    assert str(status) in caught.value.reason


def test_slower_than_the_read_timeout_is_a_transient_timeout(standin, settings):
    settings.INTERNAL_SEARCH_READ_TIMEOUT = 0.3
    script(standin, {"delay_ms": 1200})
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is False
    assert "timed out" in caught.value.reason


def test_connection_refused_is_transient(settings):
    settings.INTERNAL_SEARCH_URL = f"http://127.0.0.1:{free_port()}/fhir"
    settings.INTERNAL_SEARCH_CONNECT_TIMEOUT = 1.0
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is False
    assert "unreachable" in caught.value.reason
    assert isinstance(caught.value.__cause__, NewConnectionError)


@pytest.fixture
def guarded_standin(settings: Any) -> Iterator[StandinServer]:
    server = make_server("127.0.0.1", 0, token="internal-search-token-1")
    settings.INTERNAL_SEARCH_URL = server.base_url
    settings.INTERNAL_SEARCH_READ_TIMEOUT = 2.0
    with serving(server):
        yield server


def test_bearer_token_is_sent_when_configured(guarded_standin, settings):
    settings.INTERNAL_SEARCH_TOKEN = ""
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is True
    assert "401" in caught.value.reason

    settings.INTERNAL_SEARCH_TOKEN = "wrong-token"
    with pytest.raises(InternalSearchError):
        internal_search_match(patient())

    settings.INTERNAL_SEARCH_TOKEN = "internal-search-token-1"
    answer = internal_search_match(patient())
    assert isinstance(answer, list)
    assert answer[0].internal_patient_id == JANE_DOE_ID
    statuses = [r["status"] for r in control(guarded_standin, "stats")["requests"]]
    assert statuses == [401, 401, 200]


# --- answers the stand-in cannot give: a tiny fixed-answer server ------------------------------


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int = 0  # tells the client's connections apart


@dataclass
class Canned:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    # Close each connection after its answer: "said" in a Connection header, "idle" without
    # a word (as a server's idle timeout does).
    close: str = ""


class CannedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, canned: Canned) -> None:
        super().__init__(("127.0.0.1", 0), _CannedHandler)
        self.canned = canned

    @property
    def base_url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}/fhir"


class _CannedHandler(BaseHTTPRequestHandler):
    server: CannedServer
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        canned = self.server.canned
        canned.seen.append(
            Seen(
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                self.rfile.read(length),
                self.client_address[1],
            )
        )
        self.send_response(canned.status)
        for name, value in canned.headers.items():
            self.send_header(name, value)
        if canned.close == "said":
            self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(canned.body)))
        self.end_headers()
        self.wfile.write(canned.body)
        if canned.close:
            self.close_connection = True

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def canned(settings: Any) -> Iterator[Canned]:
    answer = Canned()
    server = CannedServer(answer)
    settings.INTERNAL_SEARCH_URL = server.base_url
    settings.INTERNAL_SEARCH_TOKEN = ""
    settings.INTERNAL_SEARCH_READ_TIMEOUT = 2.0
    with serving(server):
        yield answer


def test_request_is_a_fhir_match_with_the_parameters(canned, settings):
    settings.INTERNAL_SEARCH_COUNT = 4
    settings.INTERNAL_SEARCH_TOKEN = "tok-1"
    canned.body = json.dumps(bundle(entry("abc", 0.97))).encode()
    data = patient()
    assert internal_search_match(data) == [Candidate("abc", 0.97, "certain")]
    [seen] = canned.seen
    assert seen.path == "/fhir/Patient/$match"
    assert seen.headers["content-type"] == "application/fhir+json"
    assert seen.headers["accept"] == "application/fhir+json"
    assert seen.headers["authorization"] == "Bearer tok-1"
    assert json.loads(seen.body) == match_parameters(data, count=4)
    assert data["id"].encode() not in seen.body


def test_no_authorization_header_without_a_token(canned):
    canned.body = json.dumps(bundle()).encode()
    assert internal_search_match(patient()) == []
    assert "authorization" not in canned.seen[0].headers


@pytest.mark.parametrize(
    "body",
    [
        b'{"resourceType": "OperationOutcome", "issue": []}',
        b"<html>maintenance</html>",
        b"",
        json.dumps(bundle(entry("x", 1.5))).encode(),
        json.dumps(bundle({"resource": {"resourceType": "Patient"}})).encode(),
    ],
    ids=["operation-outcome", "html", "empty", "score-out-of-range", "entry-without-id"],
)
def test_a_200_that_is_not_a_valid_bundle_is_permanent(canned, body):
    canned.body = body
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is True
    assert "invalid Bundle" in caught.value.reason


def test_a_bundle_with_a_malformed_search_element_is_permanent(canned):
    canned.body = json.dumps(
        bundle({"resource": {"resourceType": "Patient", "id": "x"}, "search": "match"})
    ).encode()
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is True


def test_a_redirect_is_not_followed_and_is_permanent(canned):
    canned.status = 302
    canned.headers = {"Location": "/elsewhere/Patient/$match"}
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is True
    assert [s.path for s in canned.seen] == ["/fhir/Patient/$match"]


def test_a_2xx_other_than_200_is_permanent(canned):
    canned.status = 202
    canned.headers = {"Content-Location": "/fhir/$match-jobs/abc"}
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert caught.value.permanent is True


def test_retry_after_as_an_http_date_is_left_to_our_backoff(canned):
    canned.status = 503
    canned.headers = {"Retry-After": "Wed, 21 Oct 2037 07:28:00 GMT"}
    with pytest.raises(InternalSearchError) as caught:
        internal_search_match(patient())
    assert (caught.value.permanent, caught.value.retry_after) == (False, None)


def test_searches_reuse_one_keep_alive_connection(canned):
    canned.body = json.dumps(bundle()).encode()
    for _ in range(5):
        assert internal_search_match(patient()) == []
    assert len({seen.client_port for seen in canned.seen}) == 1


def test_concurrent_searches_share_the_pool_and_keep_their_connections(canned):
    canned.body = json.dumps(bundle(entry("abc", 0.97))).encode()
    with ThreadPoolExecutor(8) as threads:
        for _ in range(3):
            answers = list(threads.map(lambda _: internal_search_match(patient()), range(8)))
            assert answers == [[Candidate("abc", 0.97, "certain")]] * 8
    # Connections go back to the pool: never more than one per call in flight at once.
    assert len(canned.seen) == 24
    assert len({seen.client_port for seen in canned.seen}) <= 8


@pytest.mark.parametrize("close", ["said", "idle"])
def test_a_connection_the_server_closed_is_not_reused(canned, close):
    canned.body = json.dumps(bundle()).encode()
    canned.close = close
    for _ in range(3):
        assert internal_search_match(patient()) == []
        # "idle": the server's FIN arrives before the next call, which must see the connection
        # dropped and open another rather than fail.
        time.sleep(0.05)
    assert len({seen.client_port for seen in canned.seen}) == 3
