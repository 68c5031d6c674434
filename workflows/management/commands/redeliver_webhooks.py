import datetime as dt
import uuid
from argparse import ArgumentParser, ArgumentTypeError
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from workflows.management.commands.stuck_report import duration
from workflows.services import webhook_redeliver


def since(value: str) -> dt.datetime:
    """An ISO date/datetime, or a duration ago such as 2h."""
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return timezone.now() - dt.timedelta(seconds=duration(value))
    if timezone.is_naive(parsed):
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed


class Command(BaseCommand):
    help = "Send webhooks again (same webhook-id, the retry schedule restarts)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--workflow",
            type=uuid.UUID,
            action="append",
            dest="workflows",
            metavar="ID",
            help="every delivery of this workflow (repeatable)",
        )
        parser.add_argument(
            "--failed-since",
            type=since,
            metavar="WHEN",
            help="deliveries exhausted or disabled since WHEN (ISO or e.g. 2h)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["workflows"] and options["failed_since"] is None:
            raise CommandError("name --workflow ID or --failed-since WHEN")
        try:
            count = webhook_redeliver(
                workflow_ids=options["workflows"], failed_since=options["failed_since"]
            )
        except ArgumentTypeError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"re-queued {count} delivery(ies)")
