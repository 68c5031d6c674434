import uuid
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from merchant.management.commands.onboard_customer import print_credentials
from merchant.models import Customer
from merchant.services import customer_issue_token


class Command(BaseCommand):
    help = "Issue a new token for a customer (earlier tokens keep working until revoked)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("customer_id", type=uuid.UUID)
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            credentials = customer_issue_token(customer_id=options["customer_id"])
        except Customer.DoesNotExist as exc:
            raise CommandError(f"No customer {options['customer_id']}") from exc
        print_credentials(self, credentials.as_dict(), as_json=options["json"])
