"""The short versions of a few fault scenarios, in `make test`; `make chaos` runs them all."""

import pytest

from tests.chaos.scenarios import SCENARIOS

SUBSET = {1, 4, 7, 8, 10, 12, 14, 19, 20, 25}


@pytest.mark.parametrize(
    "scenario",
    [s for s in SCENARIOS if s.number in SUBSET],
    ids=lambda s: f"{s.number}-{s.name.replace(' ', '-')}",
)
def test_scenario_quick(scenario) -> None:
    verdict = scenario.run(True)
    assert verdict.workflows > 0
    assert verdict.ok, (
        f"{verdict.scenario}: lost {verdict.lost}, duplicated {verdict.duplicated}, "
        f"unexpected {verdict.unexpected}; {verdict.notes}"
    )
