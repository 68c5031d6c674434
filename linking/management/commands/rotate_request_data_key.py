import json
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from linking.services import request_data_rotate_key


class Command(BaseCommand):
    help = (
        "Re-encrypt every request's data under the first of REQUEST_DATA_KEYS. Rotation: put the "
        "new key first, deploy everywhere, run this, then drop the old key. Safe to run again."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--batch-size", type=int, default=500, metavar="ROWS")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be >= 1")
        report = request_data_rotate_key(batch_size=options["batch_size"])
        self.stdout.write(json.dumps(report.as_dict()))
        if report.unreadable:
            # The old key is still needed by these rows: dropping it now would lose them.
            raise CommandError(
                f"{len(report.unreadable)} request(s) open with none of the configured keys; "
                "keep every old key until this command reports none"
            )
