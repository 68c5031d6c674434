"""Client of the internal system's FHIR R4 `Patient/$match` (docs/internal-search-contract.md)."""

import functools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import urllib3
from django.conf import settings
from urllib3.exceptions import HTTPError as TransportError
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import TimeoutError as TransportTimeout

from linking import metrics
from workflows import concurrent

P = ParamSpec("P")
R = TypeVar("R")

MATCH_GRADE_URL = "http://hl7.org/fhir/StructureDefinition/match-grade"
MATCH_GRADES = {"certain", "probable", "possible", "certainly-not"}
FHIR_JSON = "application/fhir+json"
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# Statuses that say "try again later" (contract: 408, 429, 5xx); every other 4xx is final.
TRANSIENT_STATUSES = {408, 429}


# Answers that say the internal system itself is down, not this request: with transport failures
# (refused, reset, timed out) they count toward opening the circuit breaker (workflows/breaker.py).
OUTAGE_STATUSES = {502, 503, 504}


class InternalSearchError(Exception):
    """The search did not give a usable answer. `permanent`: retrying cannot help. `outage`:
    the internal system itself looks down (a transport failure, 502/503/504). `throttled`: it
    answered 429, asking every caller to wait `retry_after` seconds."""

    def __init__(
        self,
        reason: str,
        *,
        permanent: bool,
        retry_after: float | None = None,
        outage: bool = False,
        throttled: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.retry_after = retry_after
        self.outage = outage
        self.throttled = throttled


def _search_error_kind(exc: BaseException) -> str:
    """The `kind` label of merchant_internal_search_errors (linking.metrics.SEARCH_ERROR_KINDS)."""
    if isinstance(exc, SearchJobLost):
        return "job_lost"
    if not isinstance(exc, InternalSearchError):
        return "other"
    cause = exc.__cause__
    # NewConnectionError is still a ConnectTimeoutError in urllib3 2: a refusal is no timeout.
    if isinstance(cause, TransportTimeout) and not isinstance(cause, NewConnectionError):
        return "timeout"
    if isinstance(cause, TransportError | OSError):
        return "connection"
    if isinstance(cause, ValueError | TypeError | KeyError):
        return "invalid_response"
    return "refused" if exc.permanent else "unavailable"  # 4xx / 5xx, 408, 429


def internal_call_metered(operation: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator of a call to the internal system: its latency, and its errors by kind."""
    seconds = metrics.INTERNAL_SEARCH_SECONDS.labels(operation)

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def metered(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                metrics.INTERNAL_SEARCH_ERRORS.labels(operation, _search_error_kind(exc)).inc()
                raise
            finally:
                seconds.observe(time.perf_counter() - started)

        return metered

    return decorate


@dataclass(frozen=True)
class Candidate:
    internal_patient_id: str
    score: float
    grade: str
    # The internal Patient as the Bundle gave it: internal demographics, so never in a repr (a
    # log line) and never stored; a review compares the request with it (linking.agreement).
    resource: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Filled in for a review: which of the fields the customer sent agree (booleans only).
    agreement: dict[str, bool] | None = field(default=None, compare=False)


def _connections() -> urllib3.PoolManager:
    # maxsize: the connections kept per host, one per thread that may search at once;
    # block=False: a burst beyond it opens more, and closes them after use.
    return urllib3.PoolManager(num_pools=4, maxsize=concurrent.io_threads(), retries=False)


# The process's keep-alive connections to the internal system, shared by its threads.
#
# urllib3 directly rather than requests: a search through a requests Session cost 1.4-1.7 ms of
# CPU, through urllib3 0.76-0.83 ms (measured against the stand-in, one thread, the same
# request), and requests added nothing we use (no redirects, no retries, no cookies; its proxy
# and .netrc lookups from the environment, one stat per call, are not wanted for an internal
# system).
_http = concurrent.PerProcess(_connections)


def match_parameters(patient: dict[str, Any], *, count: int) -> dict[str, Any]:
    """The FHIR Parameters body for a patient; absent elements are left out, never empty.

    The customer's own patient id is not sent to the internal system.
    """
    resource: dict[str, Any] = {"resourceType": "Patient"}
    words = patient["full_name"].split()
    name: dict[str, Any] = {"text": " ".join(words)}
    if len(words) > 1:
        name["family"] = words[-1]
        name["given"] = words[:-1]
    else:
        name["family"] = words[0]
    resource["name"] = [name]
    resource["birthDate"] = patient["dob"]
    contact = patient.get("contact") or {}
    telecom = [
        {"system": system, "value": contact[key]}
        for key, system in (("phone", "phone"), ("email", "email"))
        if contact.get(key)
    ]
    if telecom:
        resource["telecom"] = telecom
    if contact.get("address"):
        resource["address"] = [{"text": contact["address"]}]
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": resource},
            {"name": "count", "valueInteger": count},
            {"name": "onlyCertainMatches", "valueBoolean": False},
        ],
    }


def _retry_after(response: urllib3.BaseHTTPResponse) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date, or nothing: our own backoff decides


def _headers() -> dict[str, str]:
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if settings.INTERNAL_SEARCH_TOKEN:
        headers["Authorization"] = f"Bearer {settings.INTERNAL_SEARCH_TOKEN}"
    return headers


def _timeout() -> urllib3.Timeout:
    return urllib3.Timeout(
        connect=settings.INTERNAL_SEARCH_CONNECT_TIMEOUT, read=settings.INTERNAL_SEARCH_READ_TIMEOUT
    )


def _request(method: str, url: str, what: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
    """One request, the whole body read; a transport failure becomes a transient error whose
    cause is urllib3's own exception (the metrics tell timeouts from connection failures)."""
    try:
        return _http.get().request(
            method, url, timeout=_timeout(), redirect=False, retries=False, **kwargs
        )
    except NewConnectionError as exc:
        # Checked before the timeout: urllib3 still makes NewConnectionError a subclass of
        # ConnectTimeoutError, and a refused connection is not a timeout.
        raise InternalSearchError(
            f"{what} unreachable ({type(exc).__name__})", permanent=False, outage=True
        ) from exc
    except TransportTimeout as exc:
        raise InternalSearchError(f"{what} timed out", permanent=False, outage=True) from exc
    except (TransportError, OSError) as exc:
        raise InternalSearchError(
            f"{what} unreachable ({type(exc).__name__})", permanent=False, outage=True
        ) from exc


@internal_call_metered("read")
def internal_patient_read(internal_patient_id: str) -> dict[str, Any] | None:
    """The internal system's Patient resource (contract section 3), or None if it is unknown."""
    if not FHIR_ID.fullmatch(internal_patient_id):
        return None
    response = _request(
        "GET",
        f"{settings.INTERNAL_SEARCH_URL}/Patient/{internal_patient_id}",
        "internal read",
        headers=_headers(),
    )
    status = response.status
    if status in (404, 410):
        return None
    if status != 200:
        raise InternalSearchError(
            f"internal read answered {status}",
            permanent=400 <= status < 500 and status not in TRANSIENT_STATUSES,
            retry_after=_retry_after(response),
        )
    try:
        resource = response.json()
    except ValueError as exc:
        raise InternalSearchError("internal read answered invalid JSON", permanent=True) from exc
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        raise InternalSearchError("internal read answered something else", permanent=True)
    return resource


@dataclass(frozen=True)
class SearchRequested:
    """The internal system took the search as a job (contract section 2): the result comes by
    callback, or by polling the job."""

    search_id: str


class SearchJobLost(InternalSearchError):
    """The job URL answers 404/410: the internal system forgot the job; search again."""

    def __init__(self) -> None:
        super().__init__("search job unknown to the internal system", permanent=False)


# URL-safe characters, but not a dot segment ("." or ".."): the job URL must name the job.
SEARCH_ID = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9\-._~]{1,200}")


def job_url(search_id: str) -> str:
    # Built from our own setting, never from the Content-Location we were given: a job URL
    # pointing elsewhere must not make the sweep call an arbitrary host.
    return f"{settings.INTERNAL_SEARCH_URL}/$match-jobs/{search_id}"


def _search_id(content_location: str) -> str:
    search_id = urlsplit(content_location).path.rstrip("/").rsplit("/", 1)[-1]
    if not SEARCH_ID.fullmatch(search_id):
        raise InternalSearchError(
            "internal search answered 202 without a usable Content-Location", permanent=True
        )
    return search_id


def _call(method: str, url: str, what: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
    response = _request(method, url, what, **kwargs)
    status = response.status
    if status >= 500 or status in TRANSIENT_STATUSES:
        raise InternalSearchError(
            f"{what} answered {status}",
            permanent=False,
            retry_after=_retry_after(response),
            outage=status in OUTAGE_STATUSES,
            throttled=status == 429,
        )
    return response


def internal_search_probe() -> bool:
    """The circuit breaker's probe (contract section 4): True when `GET [base]/metadata` answers
    200 with a CapabilityStatement. Never raises; waits at most the connect timeout plus
    INTERNAL_SEARCH_BREAKER_PROBE_SECONDS (a hanging server is a failed probe)."""
    timeout = urllib3.Timeout(
        connect=settings.INTERNAL_SEARCH_CONNECT_TIMEOUT,
        read=min(
            settings.INTERNAL_SEARCH_READ_TIMEOUT, settings.INTERNAL_SEARCH_BREAKER_PROBE_SECONDS
        ),
    )
    headers = {"Accept": FHIR_JSON}
    if settings.INTERNAL_SEARCH_TOKEN:
        headers["Authorization"] = f"Bearer {settings.INTERNAL_SEARCH_TOKEN}"
    started = time.perf_counter()
    try:
        response = _http.get().request(
            "GET",
            f"{settings.INTERNAL_SEARCH_URL}/metadata",
            headers=headers,
            timeout=timeout,
            redirect=False,
            retries=False,
        )
        ok = response.status == 200 and response.json().get("resourceType") == "CapabilityStatement"
    except (TransportError, OSError, ValueError, AttributeError):
        ok = False
    metrics.INTERNAL_SEARCH_SECONDS.labels("probe").observe(time.perf_counter() - started)
    if not ok:
        metrics.INTERNAL_SEARCH_ERRORS.labels("probe", "unavailable").inc()
    return ok


def _candidates(response: urllib3.BaseHTTPResponse, what: str) -> list[Candidate]:
    try:
        return parse_bundle(response.json())
    except (ValueError, TypeError, KeyError) as exc:
        raise InternalSearchError(
            f"{what} answered an invalid Bundle ({exc})", permanent=True
        ) from exc


@internal_call_metered("match")
def internal_search_match(patient: dict[str, Any]) -> list[Candidate] | SearchRequested:
    """Search the internal index; candidates best first (certainly-not ones dropped), or, with
    INTERNAL_SEARCH_ASYNC, possibly the job the internal system made of it."""
    headers = _headers()
    if settings.INTERNAL_SEARCH_ASYNC:
        headers["Prefer"] = "respond-async"
    response = _call(
        "POST",
        f"{settings.INTERNAL_SEARCH_URL}/Patient/$match",
        "internal search",
        body=json.dumps(match_parameters(patient, count=settings.INTERNAL_SEARCH_COUNT)).encode(),
        headers=headers,
    )
    status = response.status
    if status == 202 and settings.INTERNAL_SEARCH_ASYNC:
        return SearchRequested(_search_id(response.headers.get("Content-Location", "")))
    if status != 200:
        raise InternalSearchError(f"internal search refused the request ({status})", permanent=True)
    return _candidates(response, "internal search")


@internal_call_metered("poll")
def internal_search_poll(search_id: str) -> list[Candidate] | None:
    """The result of an asynchronous search: candidates when the job is done, None while it is
    pending. Raises SearchJobLost when the internal system no longer knows the job."""
    response = _call("GET", job_url(search_id), "search job poll", headers=_headers())
    status = response.status
    if status == 202:
        return None
    if status in (404, 410):
        raise SearchJobLost()
    if status != 200:
        raise InternalSearchError(f"search job poll refused ({status})", permanent=True)
    return _candidates(response, "search job poll")


def parse_bundle(bundle: Any) -> list[Candidate]:
    """Candidates of a searchset Bundle, best first; raises ValueError if it is not one."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ValueError("not a Bundle")
    if bundle.get("type") != "searchset":
        raise ValueError("not a searchset")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise ValueError("entry is not a list")
    candidates = [_candidate(entry) for entry in entries]
    # Stable sort: the server's order breaks ties.
    return sorted(
        (c for c in candidates if c.grade != "certainly-not"), key=lambda c: c.score, reverse=True
    )


def _candidate(entry: Any) -> Candidate:
    if not isinstance(entry, dict):
        raise ValueError("entry is not an object")
    resource = entry.get("resource")
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        raise ValueError("entry is not a Patient")
    patient_id = resource.get("id")
    # FHIR ids are 1-64 of [A-Za-z0-9-.]; anything else is refused, never cut to fit.
    if not isinstance(patient_id, str) or not FHIR_ID.fullmatch(patient_id):
        raise ValueError("entry has no valid Patient id")
    search = entry.get("search", {})
    if not isinstance(search, dict):
        raise ValueError("search is not an object")
    score = search.get("score", 0.0)
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
        raise ValueError("score is not a number in 0..1")
    extensions = search.get("extension", [])
    if not isinstance(extensions, list) or not all(isinstance(e, dict) for e in extensions):
        raise ValueError("search.extension is not a list of objects")
    grade = next(
        (e.get("valueCode") for e in extensions if e.get("url") == MATCH_GRADE_URL), "possible"
    )
    if not isinstance(grade, str) or grade not in MATCH_GRADES:
        raise ValueError(f"unknown match grade {grade!r}")
    return Candidate(patient_id, float(score), grade, resource=resource)
