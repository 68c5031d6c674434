import json
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from linking.services import request_data_purge_expired


class Command(BaseCommand):
    help = (
        "Delete the request data (demographics) of workflows that ended more than "
        "REQUEST_DATA_RETENTION_DAYS ago (what beat runs every "
        "REQUEST_DATA_PURGE_INTERVAL_SECONDS)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--days",
            type=int,
            default=None,
            metavar="DAYS",
            help="override REQUEST_DATA_RETENTION_DAYS for this run",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["days"]
        if days is not None and days < 0:
            raise CommandError("--days must be >= 0")
        self.stdout.write(json.dumps({"purged": request_data_purge_expired(retention_days=days)}))
