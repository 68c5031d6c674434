import json
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from merchant.models import ReviewBy
from merchant.services import customer_onboard
from merchant.webhook_urls import WebhookURLError


class Command(BaseCommand):
    help = "Onboard a customer: prints its id, a token and its webhook signing secret."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument("--webhook-url", required=True)
        parser.add_argument(
            "--review-by",
            choices=ReviewBy.values,
            default=ReviewBy.OPERATOR,
            help="who decides the workflows sent to REVIEW (default: operator)",
        )
        parser.add_argument(
            "--weight",
            type=int,
            default=1,
            help="its share of each scheduling round against other customers' due work "
            "(1 to 100, default 1)",
        )
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            credentials = customer_onboard(
                name=options["name"],
                webhook_url=options["webhook_url"],
                review_by=options["review_by"],
                weight=options["weight"],
            )
        except (WebhookURLError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        print_credentials(self, credentials.as_dict(), as_json=options["json"])


def print_credentials(command: BaseCommand, values: dict[str, str], *, as_json: bool) -> None:
    if as_json:
        command.stdout.write(json.dumps(values))
        return
    for name, value in values.items():
        command.stdout.write(f"{name}: {value}")
    command.stdout.write("Keep the token and the webhook secret safe: they are shown once.")
