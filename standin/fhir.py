"""FHIR R4 shapes the stand-in reads (Parameters) and writes (Bundle, OperationOutcome)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from standin.matching import Demographics, Match, demographics_of

MATCH_GRADE_URL = "http://hl7.org/fhir/StructureDefinition/match-grade"
PATIENT_MATCH_DEFINITION = "http://hl7.org/fhir/OperationDefinition/Patient-match"
DEFAULT_COUNT = 10
MAX_COUNT = 100

# OperationOutcome.issue.code per HTTP status, so clients can tell failures apart without
# parsing diagnostics.
_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    404: "not-found",
    405: "not-supported",
    413: "too-costly",
    429: "throttled",
    503: "transient",
    504: "timeout",
}


def operation_outcome(status: int, diagnostics: str) -> dict[str, Any]:
    if status < 300:
        severity, code = "information", "informational"
    else:
        severity, code = "error", _ISSUE_CODES.get(status, "exception")
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def capability_statement(base_url: str, date: str) -> dict[str, Any]:
    """The answer to ``GET {base}/metadata``: the interactions the stand-in serves, no more."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        # Invariant cpb-14: a statement of kind "instance" must have an implementation.
        "implementation": {"description": "Internal patient index stand-in", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": "Patient",
                        "interaction": [{"code": "read"}],
                        "operation": [{"name": "match", "definition": PATIENT_MATCH_DEFINITION}],
                    }
                ],
            }
        ],
    }


@dataclass(frozen=True)
class MatchRequest:
    query: Demographics
    count: int
    only_certain: bool


def parse_match_parameters(body: Any) -> MatchRequest:
    """Validate a $match Parameters body; raises ValueError with a client-facing message."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise ValueError("body must be a FHIR Parameters resource")
    parameters = body.get("parameter")
    if not isinstance(parameters, list) or not all(isinstance(p, dict) for p in parameters):
        raise ValueError("Parameters.parameter must be an array of objects")
    by_name = {p.get("name"): p for p in parameters}

    resource = by_name.get("resource", {}).get("resource")
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        raise ValueError("a 'resource' parameter holding a Patient is required")

    count = by_name.get("count", {}).get("valueInteger", DEFAULT_COUNT)
    # bool is a subclass of int in Python but not a valueInteger in FHIR.
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be an integer between 1 and {MAX_COUNT}")

    only_certain = by_name.get("onlyCertainMatches", {}).get("valueBoolean", False)
    if not isinstance(only_certain, bool):
        raise ValueError("onlyCertainMatches must be a boolean")

    return MatchRequest(demographics_of(resource), count, only_certain)


def searchset(base_url: str, matches: list[Match], resources: dict[str, Any]) -> dict[str, Any]:
    """A $match result Bundle; ``total`` counts the entries returned (there is no paging)."""
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(matches)}
    if matches:
        bundle["entry"] = [
            {
                "fullUrl": f"{base_url}/Patient/{match.patient_id}",
                "resource": resources[match.patient_id],
                "search": {
                    "mode": "match",
                    "score": match.score,
                    "extension": [{"url": MATCH_GRADE_URL, "valueCode": match.grade.value}],
                },
            }
            for match in matches
        ]
    return bundle
