import json
import re
from argparse import ArgumentParser, ArgumentTypeError
from typing import Any

from django.core.management.base import BaseCommand

from workflows.selectors import workflows_stuck_report

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: str) -> int:
    """'90', '90s', '15m', '1h', '2d' -> seconds."""
    match = re.fullmatch(r"(\d+)([smhd]?)", value.strip())
    if not match:
        raise ArgumentTypeError(f"not a duration: {value!r} (use e.g. 90s, 15m, 1h, 2d)")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


class Command(BaseCommand):
    help = (
        "Pending workflows not updated for a while: counts by state and age, oldest ids; "
        "and the reviews waiting, by reviewer and age."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--older-than",
            type=duration,
            default=None,
            help="e.g. 1h (default: RECONCILE_STALE_AFTER_SECONDS)",
        )
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args: Any, **options: Any) -> None:
        report = workflows_stuck_report(older_than_seconds=options["older_than"])
        if options["json"]:
            self.stdout.write(json.dumps(report))
            return
        self.stdout.write(f"stuck workflows: {report['total']}")
        for state, count in sorted(report["by_state"].items()):
            self.stdout.write(f"  {state:<12} {count}")
        for bucket, count in report["by_age"].items():
            self.stdout.write(f"  age {bucket:<8} {count}")
        for workflow_id in report["oldest"]:
            self.stdout.write(f"  {workflow_id}")
        reviews = report["reviews"]
        self.stdout.write(
            f"reviews waiting: {reviews['total']} (expire after {reviews['timeout_seconds']} s)"
        )
        for reviewer, count in sorted(reviews["by_reviewer"].items()):
            self.stdout.write(f"  by {reviewer:<9} {count}")
        for bucket, count in reviews["by_age"].items():
            self.stdout.write(f"  age {bucket:<8} {count}")
