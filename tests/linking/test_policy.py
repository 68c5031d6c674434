"""Which candidate links (linking/policy.py) and how long a transient failure waits before the
next try (retry_backoff in linking/services/process.py)."""

import random

import pytest

from linking.internal_search import Candidate
from linking.policy import REASON_AMBIGUOUS, REASON_NO_MATCH, Bands, Decision, Outcome, link_decide
from linking.services.process import retry_backoff


def c(patient_id: str, score: float, grade: str = "probable") -> Candidate:
    return Candidate(patient_id, score, grade)


def bands(auto: float = 0.9, margin: float = 0.1, review: float = 0.5) -> Bands:
    return Bands(auto_link_score=auto, auto_link_margin=margin, review_min_score=review)


# (candidates best first, auto-link score, margin) -> id that links, or None: then every one of
# these goes to review, since each top candidate scores at least the review minimum (0.5).
CASES = [
    pytest.param([], 0.9, 0.1, "no-match", id="none"),
    pytest.param([c("a", 0.97, "certain")], 0.9, 0.1, "a", id="single-certain"),
    pytest.param(
        [c("a", 0.97, "certain"), c("b", 0.56, "possible")],
        0.9,
        0.1,
        "a",
        id="single-certain-among-others",
    ),
    pytest.param(
        [c("p", 0.99, "probable"), c("a", 0.97, "certain")],
        0.9,
        0.1,
        "a",
        id="single-certain-always-links-even-below-the-top-score",
    ),
    pytest.param(
        [c("a", 0.60, "certain")], 0.9, 0.1, "a", id="single-certain-links-whatever-its-score"
    ),
    pytest.param(
        [c("a", 0.97, "certain"), c("b", 0.97, "certain")], 0.9, 0.1, None, id="two-certain-tied"
    ),
    pytest.param(
        [c("a", 0.98, "certain"), c("b", 0.97, "certain")], 0.9, 0.1, None, id="two-certain-close"
    ),
    pytest.param(
        [c("a", 0.95), c("b", 0.60, "possible")], 0.9, 0.1, "a", id="top-above-score-with-margin"
    ),
    pytest.param([c("a", 0.95), c("b", 0.90)], 0.9, 0.1, None, id="top-above-score-no-margin"),
    pytest.param([c("a", 0.85)], 0.9, 0.1, None, id="single-below-score"),
    pytest.param(
        [c("a", 0.85), c("b", 0.30, "possible")], 0.9, 0.1, None, id="top-below-score-big-margin"
    ),
    pytest.param([c("a", 0.92)], 0.9, 0.1, "a", id="single-probable-high-score"),
    pytest.param([c("a", 0.68, "possible")], 0.6, 0.1, "a", id="single-possible-over-threshold"),
    # Boundaries, on values that are exact in binary floating point.
    pytest.param([c("a", 0.75)], 0.75, 0.25, "a", id="score-exactly-min-score"),
    pytest.param([c("a", 0.74)], 0.75, 0.25, None, id="score-just-below-min-score"),
    pytest.param([c("a", 0.75), c("b", 0.5)], 0.75, 0.25, "a", id="margin-exactly-margin"),
    pytest.param([c("a", 0.75), c("b", 0.51)], 0.75, 0.25, None, id="margin-just-below"),
    pytest.param([c("a", 1.0), c("b", 0.75)], 0.75, 0.25, "a", id="top-score-one"),
    pytest.param([c("a", 0.5)], 0.5, 0.5, "a", id="single-exactly-both"),
    pytest.param([c("a", 0.75)], 0.75, 0.0, "a", id="zero-margin"),
    pytest.param([c("a", 0.75), c("b", 0.75)], 0.75, 0.0, "a", id="zero-margin-tie-takes-first"),
    # The review band's lower edge: below it there is no match.
    pytest.param([c("a", 0.49, "possible")], 0.9, 0.1, "no-match", id="below-review-min"),
    pytest.param(
        [c("a", 0.45), c("b", 0.40, "possible")], 0.9, 0.1, "no-match", id="all-below-review-min"
    ),
]


@pytest.mark.parametrize(("candidates", "auto", "margin", "expected"), CASES)
def test_link_decision_table(candidates, auto, margin, expected):
    decision = link_decide(candidates, bands=bands(auto, margin))
    assert isinstance(decision, Decision)
    if expected is None:
        assert (decision.outcome, decision.candidate) == (Outcome.REVIEW, None)
        assert decision.reason not in (REASON_NO_MATCH, "")
    elif expected == "no-match":
        assert (decision.outcome, decision.candidate) == (Outcome.NO_MATCH, None)
        assert decision.reason == REASON_NO_MATCH
    else:
        assert decision.outcome == Outcome.LINK
        assert decision.candidate is not None
        assert decision.candidate.internal_patient_id == expected
        assert not decision.reason.startswith(REASON_AMBIGUOUS)


def test_no_candidates_is_no_match():
    assert link_decide([], bands=bands()) == Decision(Outcome.NO_MATCH, None, REASON_NO_MATCH)


@pytest.mark.parametrize(
    ("review_min", "outcome"),
    [
        (0.5, Outcome.REVIEW),
        (0.82, Outcome.REVIEW),
        (0.83, Outcome.NO_MATCH),
        (0.0, Outcome.REVIEW),
    ],
)
def test_review_min_score_is_the_lower_edge_of_review(review_min, outcome):
    decision = link_decide([c("a", 0.82), c("b", 0.3, "possible")], bands=bands(review=review_min))
    assert decision.outcome == outcome


def test_reasons_explain_the_decision():
    certain = link_decide([c("a", 0.97, "certain")], bands=bands())
    assert certain.reason == "single certain candidate"
    scored = link_decide([c("a", 0.95), c("b", 0.5, "possible")], bands=bands())
    assert scored.reason == "score 0.95, margin 0.45"
    two = [c("a", 0.97, "certain"), c("b", 0.97, "certain")]
    assert link_decide(two, bands=bands()).reason == "ambiguous: 2 certain candidates"
    close = [c("a", 0.95), c("b", 0.9)]
    assert link_decide(close, bands=bands()).reason == "ambiguous: margin 0.05"
    probable = [c("a", 0.82)]
    assert link_decide(probable, bands=bands()).reason == "best score 0.82 (probable)"


def test_decision_does_not_reorder_or_change_the_candidates():
    candidates = [c("a", 0.95), c("b", 0.5, "possible")]
    before = list(candidates)
    link_decide(candidates, bands=bands())
    assert candidates == before


@pytest.mark.parametrize(("top", "runner_up"), [(0.9, 0.8), (0.95, 0.85), (0.97, 0.87), (1.0, 0.9)])
def test_lead_of_exactly_the_default_margin_links(top, runner_up):
    decision = link_decide([c("a", top), c("b", runner_up)], bands=bands())
    assert decision.outcome == Outcome.LINK


@pytest.mark.django_db
def test_bands_are_the_settings_unless_the_customer_has_its_own(settings, credentials):
    settings.AUTO_LINK_SCORE = 0.8
    settings.AUTO_LINK_MARGIN = 0.2
    settings.REVIEW_MIN_SCORE = 0.4
    customer = credentials.customer
    assert Bands.for_customer(customer) == bands(0.8, 0.2, 0.4)
    customer.review_min_score = 0.7
    customer.auto_link_margin = 0.0
    assert Bands.for_customer(customer) == bands(0.8, 0.0, 0.7)


# --- retry_backoff ----------------------------------------------------------------------------


@pytest.fixture
def backoff(settings):
    settings.RETRY_BACKOFF_BASE_SECONDS = 2.0
    settings.RETRY_BACKOFF_MAX_SECONDS = 60.0


def ceiling(attempt: int) -> float:
    return min(60.0, 2.0 * 2 ** (attempt - 1))


def samples(attempt: int, retry_after: float | None = None, n: int = 300) -> list[float]:
    return [retry_backoff(attempt, retry_after) for _ in range(n)]


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6, 7, 10])
def test_jitter_stays_within_half_the_ceiling_and_the_ceiling(backoff, attempt):
    top = ceiling(attempt)
    waits = samples(attempt)
    assert all(top / 2 <= wait <= top for wait in waits)
    # Jitter, not a constant: the waits spread over the window.
    assert max(waits) - min(waits) > top / 10


def test_backoff_grows_with_the_attempt_until_the_cap(backoff):
    # Attempt n+1 never waits less than attempt n (its window starts where n's ends).
    previous = samples(1)
    for attempt in range(2, 6):  # 2 s, 4 s, 8 s, 16 s, 32 s ceilings; then the 60 s cap
        current = samples(attempt)
        assert min(current) >= max(previous)
        assert sum(current) / len(current) > sum(previous) / len(previous)
        previous = current
    capped = samples(6)
    assert sum(capped) / len(capped) > sum(previous) / len(previous)
    assert max(capped) <= 60.0


@pytest.mark.parametrize("attempt", [6, 7, 12, 50, 200])
def test_backoff_never_exceeds_the_maximum(backoff, attempt):
    assert all(30.0 <= wait <= 60.0 for wait in samples(attempt))


def test_maximum_is_a_setting(settings):
    settings.RETRY_BACKOFF_BASE_SECONDS = 1.0
    settings.RETRY_BACKOFF_MAX_SECONDS = 5.0
    assert all(0.5 <= wait <= 1.0 for wait in samples(1))
    assert all(2.5 <= wait <= 5.0 for wait in samples(4))
    assert all(2.5 <= wait <= 5.0 for wait in samples(40))


def test_a_larger_retry_after_is_honoured(backoff):
    assert samples(1, retry_after=17.0, n=50) == [17.0] * 50
    assert samples(3, retry_after=45.5, n=50) == [45.5] * 50


def test_a_smaller_retry_after_does_not_shorten_the_backoff(backoff):
    waits = samples(4, retry_after=0.5)
    assert all(8.0 <= wait <= 16.0 for wait in waits)
    assert all(1.0 <= wait <= 2.0 for wait in samples(1, retry_after=0.0))


def test_retry_after_is_capped_at_the_maximum(backoff):
    assert samples(1, retry_after=3600.0, n=20) == [60.0] * 20
    assert samples(9, retry_after=61.0, n=20) == [60.0] * 20


def test_jitter_uses_the_full_window(backoff, monkeypatch):
    monkeypatch.setattr(random, "uniform", lambda low, high: low)
    assert retry_backoff(3) == 4.0
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    assert retry_backoff(3) == 8.0
    assert retry_backoff(3, retry_after=9.0) == 9.0
