"""Input quality: is a request's demographics enough to match a patient safely?

After the HL7 FHIR Identity Matching guide's idea of weighted demographics: each element that
tells patients apart adds weight; a request below MIN_DEMOGRAPHICS_SCORE, or one whose name is a
known placeholder, is refused before anything is stored or searched (docs/api.md "Input quality").
"""

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

# Weights per element (docs/api.md "Input quality").
WEIGHTS = {
    "full name (given and family)": 3,
    "single name": 1,
    "birth date": 3,
    "phone": 2,
    "email": 2,
    "address": 2,
    "insurance": 1,
}

# Names systems use when the real one is unknown; matched after normalisation, whole name only.
PLACEHOLDER_NAMES = {
    "john doe", "jane doe", "baby doe", "baby boy", "baby girl", "test patient", "patient test",
    "test test", "unknown", "unknown unknown", "unknown patient", "patient unknown", "anonymous",
    "anon", "no name", "noname", "none", "n a", "na", "null", "xxx", "trauma patient",
}  # fmt: skip


@dataclass(frozen=True)
class Quality:
    score: int
    placeholder: bool

    def refusal(self, minimum: int) -> str | None:
        """Why the request cannot be matched safely, or None."""
        if self.placeholder:
            return "The name is a placeholder (such as John Doe or Unknown); send the real name."
        if self.score < minimum:
            return (
                f"Too little to match safely: demographics score {self.score}, at least "
                f"{minimum} needed. Add a phone, an email or an address."
            )
        return None


def normalise(name: str) -> str:
    """Lower case ASCII words: accents, case and punctuation do not tell names apart."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def demographics_quality(patient: dict[str, Any]) -> Quality:
    name = normalise(patient["full_name"])
    score = (
        WEIGHTS["full name (given and family)"] if len(name.split()) > 1 else WEIGHTS["single name"]
    )
    score += WEIGHTS["birth date"] if patient.get("dob") else 0
    contact = patient.get("contact") or {}
    for element in ("phone", "email", "address"):
        if contact.get(element):
            score += WEIGHTS[element]
    if patient.get("insurance"):
        score += WEIGHTS["insurance"]
    return Quality(score=score, placeholder=name in PLACEHOLDER_NAMES)
