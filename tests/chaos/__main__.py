"""`python -m tests.chaos [N ...] [--quick] [--json FILE]`: run scenarios, print the table."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import django


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("scenarios", nargs="*", type=int, help="numbers (default: all)")
    parser.add_argument("--quick", action="store_true", help="the short versions")
    parser.add_argument("--json", help="also write the verdicts to this file")
    args = parser.parse_args()

    # Only for the stand-in/receiver imports; the harness itself talks SQL and HTTP.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings_test")
    django.setup()
    from tests.chaos.checks import Verdict
    from tests.chaos.scenarios import SCENARIOS, as_json

    chosen = [s for s in SCENARIOS if not args.scenarios or s.number in args.scenarios]
    verdicts: list[Verdict] = []
    for scenario in chosen:
        started = time.monotonic()
        print(f"== {scenario.number}. {scenario.name} ...", flush=True)
        try:
            verdict = scenario.run(args.quick)
        except Exception:
            traceback.print_exc()
            verdict = Verdict(f"{scenario.number} {scenario.name}", unexpected=1)
            verdict.note("the scenario itself crashed")
        print(
            f"   {'ok' if verdict.ok else 'VIOLATED'} in {time.monotonic() - started:.0f}s;"
            f" {'; '.join(verdict.notes)}",
            flush=True,
        )
        verdicts.append(verdict)

    header = (
        f"{'scenario':<36} {'workflows':>9} {'lost':>5} {'dup':>5} {'unexp':>6}"
        f" {'max t (s)':>9}  verdict"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for v in verdicts:
        print(
            f"{v.scenario:<36} {v.workflows:>9} {v.lost:>5} {v.duplicated:>5} {v.unexpected:>6}"
            f" {v.max_time_to_terminal:>9.1f}  {'PASS' if v.ok else 'FAIL'}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(as_json(verdicts))
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
