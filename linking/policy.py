"""Which candidate of a search links, which go to a person, and when there is no match.

Bands (settings, overridable per customer), as master-patient-index systems do it: link by
itself only when the answer is clear, send the doubtful middle to an operator, never guess.
"""

import enum
from dataclasses import dataclass

from django.conf import settings

from linking.internal_search import Candidate
from merchant.models import Customer

REASON_NO_MATCH = "no match"
REASON_AMBIGUOUS = "ambiguous"


class Outcome(enum.StrEnum):
    LINK = "link"
    REVIEW = "review"
    NO_MATCH = "no-match"


@dataclass(frozen=True)
class Bands:
    auto_link_score: float
    auto_link_margin: float
    review_min_score: float

    @classmethod
    def for_customer(cls, customer: Customer) -> "Bands":
        """The customer's own bands where set, the settings' elsewhere."""

        def pick(own: float | None, default: float) -> float:
            return default if own is None else own

        return cls(
            auto_link_score=pick(customer.auto_link_score, settings.AUTO_LINK_SCORE),
            auto_link_margin=pick(customer.auto_link_margin, settings.AUTO_LINK_MARGIN),
            review_min_score=pick(customer.review_min_score, settings.REVIEW_MIN_SCORE),
        )


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    candidate: Candidate | None
    reason: str


def _at_least(value: float, threshold: float) -> bool:
    # Rounded: scores come in hundredths, and 0.90 - 0.80 is 0.0999... in binary floating point.
    return round(value, 6) >= round(threshold, 6)


def link_decide(candidates: list[Candidate], *, bands: Bands) -> Decision:
    """`candidates` best first. Link: a single `certain` candidate, or (no `certain` one) a top
    score of at least `auto_link_score` leading the next by at least `auto_link_margin`.
    Review: anything else scoring at least `review_min_score` (probable/possible ones, several
    `certain` ones, strong ones too close to call). No match: nothing reaches that score."""
    if not candidates:
        return Decision(Outcome.NO_MATCH, None, REASON_NO_MATCH)
    certain = [c for c in candidates if c.grade == "certain"]
    if len(certain) == 1:
        return Decision(Outcome.LINK, certain[0], "single certain candidate")
    top = candidates[0]
    runner_up = candidates[1].score if len(candidates) > 1 else 0.0
    lead = top.score - runner_up
    strong = _at_least(top.score, bands.auto_link_score)
    if not certain and strong and _at_least(lead, bands.auto_link_margin):
        return Decision(Outcome.LINK, top, f"score {top.score:.2f}, margin {lead:.2f}")
    if len(certain) > 1:
        return Decision(
            Outcome.REVIEW, None, f"{REASON_AMBIGUOUS}: {len(certain)} certain candidates"
        )
    if strong:
        return Decision(Outcome.REVIEW, None, f"{REASON_AMBIGUOUS}: margin {lead:.2f}")
    if _at_least(top.score, bands.review_min_score):
        return Decision(Outcome.REVIEW, None, f"best score {top.score:.2f} ({top.grade})")
    return Decision(Outcome.NO_MATCH, None, REASON_NO_MATCH)
