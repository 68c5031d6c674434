"""Which candidate of a search links (issue: linking policy); thresholds are settings."""

from dataclasses import dataclass

from linking.internal_search import Candidate

REASON_NO_MATCH = "no match"
REASON_AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class Decision:
    candidate: Candidate | None
    reason: str


def link_decide(candidates: list[Candidate], *, min_score: float, margin: float) -> Decision:
    """A single `certain` candidate links; else the top one links only if it scores at least
    `min_score` and leads the next by at least `margin`. Anything else is never guessed."""
    if not candidates:
        return Decision(None, REASON_NO_MATCH)
    certain = [c for c in candidates if c.grade == "certain"]
    if len(certain) == 1:
        return Decision(certain[0], "single certain candidate")
    top = candidates[0]
    runner_up = candidates[1].score if len(candidates) > 1 else 0.0
    # Rounded: scores come in hundredths, and 0.90 - 0.80 is 0.0999... in binary floating point.
    lead = round(top.score - runner_up, 6)
    if round(top.score, 6) >= min_score and lead >= margin:
        return Decision(top, f"score {top.score:.2f}, margin {lead:.2f}")
    return Decision(None, REASON_AMBIGUOUS)
