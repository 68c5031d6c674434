"""How the demographics a customer sent compare with a review candidate's internal record.

What a customer deciding its own review may see (issue 19, the seed's "patient data
privacy?"): one boolean per field it sent, never the internal record itself. Only the fields the
customer sent are named; a field the internal record lacks does not agree. Names are compared
after the normalisation the input-quality check uses (case, accents, punctuation), phones by
their last ten digits, emails case-insensitively, addresses as normalised text.
"""

import re
from typing import Any

from linking.quality import normalise
from linking.services.patients import patient_details

_NOT_DIGITS = re.compile(r"\D+")


def candidate_agreement(patient: dict[str, Any], resource: dict[str, Any]) -> dict[str, bool]:
    """{"family": bool, "given": bool, "birth-date": bool, "phone": bool, "email": bool,
    "address": bool}, each only when the customer sent it. `patient` is the request's patient
    (API shape), `resource` the candidate's FHIR Patient."""
    record = patient_details(patient_id="", resource=resource)
    name = record["name"]
    text_words = normalise(name["text"] or "").split()
    families = {normalise(name["family"] or "")} | ({text_words[-1]} if text_words else set())
    givens = {normalise(given) for given in name["given"]} | set(text_words[:-1])
    families.discard("")
    givens.discard("")
    sent = normalise(patient["full_name"]).split()
    agreement: dict[str, bool] = {"family": sent[-1] in families}
    if len(sent) > 1:
        agreement["given"] = sent[0] in givens
    if patient.get("dob"):
        agreement["birth-date"] = patient["dob"] == record["birth-date"]
    contact = patient.get("contact") or {}
    telecom = [(t["system"], t["value"]) for t in record["telecom"] if isinstance(t["value"], str)]
    if contact.get("phone"):
        agreement["phone"] = _digits(contact["phone"]) in {
            _digits(value) for system, value in telecom if system == "phone"
        }
    if contact.get("email"):
        agreement["email"] = contact["email"].strip().casefold() in {
            value.strip().casefold() for system, value in telecom if system == "email"
        }
    if contact.get("address"):
        agreement["address"] = normalise(contact["address"]) in {
            normalise(address["text"] or " ".join([*address["line"], address["city"] or ""]))
            for address in record["address"]
        }
    return agreement


def _digits(phone: str) -> str:
    """The last ten digits: "+1-555-0100" and "(555) 0100" with a country code agree."""
    return _NOT_DIGITS.sub("", phone)[-10:]
