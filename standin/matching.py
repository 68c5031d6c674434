"""Deterministic patient matching for the stand-in.

The real patient index uses a probabilistic matcher; the stand-in only needs to be predictable
so that tests can aim for each match grade on purpose. Rules (scores are whole hundredths so that
they compare exactly and never drift with float arithmetic):

Normalisation
    Names: Unicode NFKD, accents dropped, case-folded, everything that is not a letter or digit
    removed ("Mary-Ann O'Brien" == "maryann obrien" == "MARYANN OBRIEN"). Only the first
    ``name`` of the query is used; family comes from ``family`` (else the last word of ``text``),
    given from ``given[0]`` (else the first word of ``text``).
    Phones: digits only; two phones agree when equal, or when both have at least 7 digits and one
    ends with the other (so "+1-555-0100" agrees with "555 0100").
    Emails: trimmed and case-folded. Addresses: the first ``line`` (else the part of ``text``
    before the first comma), normalised like names.
    Birth dates: only full YYYY-MM-DD dates take part; partial dates count as missing.

Grades (the first rule that applies wins; family must always agree)
    certain   family + first given + birthDate agree.
              0.97, +0.01 if a phone agrees, +0.01 if an email agrees (max 0.99).
    probable  family + birthDate agree but given differs or is missing, or family + given agree
              and birthDate is one day off or has month and day swapped.
              0.82, +0.03 phone, +0.03 email, +0.02 address (max 0.90).
    possible  family agrees and at least one of phone / email / address agrees.
              0.50 + 0.06 per agreeing item (0.56, 0.62 or 0.68).
    certainly-not  everything else; never returned.

Results are ordered by score descending, then patient id ascending, so ties are deterministic.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any

_FULL_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# FHIR `date` allows year or year-month precision; anything else is a malformed request.
_FHIR_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")


class Grade(StrEnum):
    CERTAIN = "certain"
    PROBABLE = "probable"
    POSSIBLE = "possible"
    CERTAINLY_NOT = "certainly-not"


@dataclass(frozen=True)
class Demographics:
    """The normalised comparison keys of one Patient (empty string / None when unknown)."""

    family: str
    given: str
    birth_date: date | None
    phones: frozenset[str]
    emails: frozenset[str]
    addresses: frozenset[str]


@dataclass(frozen=True)
class Candidate:
    patient_id: str
    demographics: Demographics


@dataclass(frozen=True)
class Match:
    patient_id: str
    grade: Grade
    score_hundredths: int

    @property
    def score(self) -> float:
        return self.score_hundredths / 100


def normalise_name(value: str) -> str:
    decomposed = unicodedata.normalize("NFKD", value).casefold()
    # Combining accent marks and punctuation are not alphanumeric, so this drops both.
    return "".join(ch for ch in decomposed if ch.isalnum())


def _phone_digits(value: str) -> str:
    return "".join(ch for ch in value if ch.isdigit())


def _list_of_objects(parent: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = parent.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(f"{where}.{key} must be an array of objects")
    return value


def _optional_str(parent: dict[str, Any], key: str, where: str) -> str:
    value = parent.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{where}.{key} must be a string")
    return value


def _str_list(parent: dict[str, Any], key: str, where: str) -> list[str]:
    value = parent.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where}.{key} must be an array of strings")
    return value


def _parse_birth_date(raw: str) -> date | None:
    if not raw:
        return None
    if not _FHIR_DATE.match(raw):
        raise ValueError("Patient.birthDate must be a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)")
    if not _FULL_DATE.match(raw):
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ValueError("Patient.birthDate is not a calendar date") from None


def demographics_of(patient: dict[str, Any]) -> Demographics:
    """Extract comparison keys; raises ValueError when an element has the wrong JSON type."""
    names = _list_of_objects(patient, "name", "Patient")
    family = given = ""
    if names:
        first = names[0]
        words = _optional_str(first, "text", "Patient.name").split()
        family = _optional_str(first, "family", "Patient.name") or (words[-1] if words else "")
        givens = _str_list(first, "given", "Patient.name")
        # A one-word text is a family name, so it must not double as the given name.
        given = givens[0] if givens else (words[0] if len(words) > 1 else "")

    phones: set[str] = set()
    emails: set[str] = set()
    for contact in _list_of_objects(patient, "telecom", "Patient"):
        system = _optional_str(contact, "system", "Patient.telecom")
        value = _optional_str(contact, "value", "Patient.telecom")
        if system == "phone" and _phone_digits(value):
            phones.add(_phone_digits(value))
        elif system == "email" and value.strip():
            emails.add(value.strip().casefold())

    addresses: set[str] = set()
    for address in _list_of_objects(patient, "address", "Patient"):
        lines = _str_list(address, "line", "Patient.address")
        first_line = lines[0] if lines else _optional_str(address, "text", "Patient.address")
        key = normalise_name(first_line.split(",")[0])
        if key:
            addresses.add(key)

    return Demographics(
        family=normalise_name(family),
        given=normalise_name(given),
        birth_date=_parse_birth_date(_optional_str(patient, "birthDate", "Patient")),
        phones=frozenset(phones),
        emails=frozenset(emails),
        addresses=frozenset(addresses),
    )


def _phones_agree(left: frozenset[str], right: frozenset[str]) -> bool:
    for a in left:
        for b in right:
            if a == b or (min(len(a), len(b)) >= 7 and (a.endswith(b) or b.endswith(a))):
                return True
    return False


def _near_birth_date(query: date, stored: date) -> bool:
    """One day off, or day and month swapped (a classic US/EU data-entry mix-up)."""
    swapped = query.year == stored.year and (query.month, query.day) == (stored.day, stored.month)
    return swapped or abs((query - stored).days) == 1


def grade(query: Demographics, stored: Demographics) -> tuple[Grade, int]:
    """Grade one stored patient against the query; the score is in hundredths."""
    if not query.family or query.family != stored.family:
        return Grade.CERTAINLY_NOT, 0
    phone = _phones_agree(query.phones, stored.phones)
    email = bool(query.emails & stored.emails)
    address = bool(query.addresses & stored.addresses)
    same_given = bool(query.given) and query.given == stored.given
    same_dob = query.birth_date is not None and query.birth_date == stored.birth_date
    near_dob = (
        query.birth_date is not None
        and stored.birth_date is not None
        and _near_birth_date(query.birth_date, stored.birth_date)
    )
    if same_given and same_dob:
        return Grade.CERTAIN, 97 + phone + email
    if same_dob or (same_given and near_dob):
        return Grade.PROBABLE, 82 + 3 * phone + 3 * email + 2 * address
    agreeing = phone + email + address
    if agreeing:
        return Grade.POSSIBLE, 50 + 6 * agreeing
    return Grade.CERTAINLY_NOT, 0


def rank(
    query: Demographics, candidates: list[Candidate], count: int, only_certain: bool
) -> list[Match]:
    matches = []
    for candidate in candidates:
        match_grade, score = grade(query, candidate.demographics)
        if match_grade is Grade.CERTAINLY_NOT:
            continue
        if only_certain and match_grade is not Grade.CERTAIN:
            continue
        matches.append(Match(candidate.patient_id, match_grade, score))
    matches.sort(key=lambda m: (-m.score_hundredths, m.patient_id))
    return matches[:count]


@dataclass(frozen=True)
class PatientIndex:
    resources: dict[str, dict[str, Any]]
    candidates: list[Candidate]


def load_patients(path: Path) -> PatientIndex:
    """Load the synthetic patient file ``{"patients": [Patient, ...]}``.

    Keys are precomputed here so that a broken data file fails at start-up, not on a $match.
    """
    document = json.loads(path.read_text(encoding="utf-8"))
    resources: dict[str, dict[str, Any]] = {}
    candidates = []
    entries = document.get("patients") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected an object with a 'patients' array")
    for patient in entries:
        patient_id = patient.get("id") if isinstance(patient, dict) else None
        if not isinstance(patient_id, str) or patient.get("resourceType") != "Patient":
            raise ValueError(f"{path}: every entry must be a Patient with an id")
        if patient_id in resources:
            raise ValueError(f"{path}: duplicate patient id {patient_id}")
        resources[patient_id] = patient
        candidates.append(Candidate(patient_id, demographics_of(patient)))
    return PatientIndex(resources, candidates)
