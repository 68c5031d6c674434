import json
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from workflows.services import workflows_reconcile


class Command(BaseCommand):
    help = "Run the reconciliation sweep now (what beat runs every RECONCILE_INTERVAL_SECONDS)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="report, change nothing")
        parser.add_argument(
            "--stale-after",
            type=int,
            default=None,
            metavar="SECONDS",
            help="override RECONCILE_STALE_AFTER_SECONDS for this run",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        report = workflows_reconcile(
            dry_run=options["dry_run"], stale_after_seconds=options["stale_after"]
        )
        self.stdout.write(json.dumps({"dry_run": options["dry_run"], **report.as_dict()}))
