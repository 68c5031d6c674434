import uuid
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from merchant.models import Customer
from merchant.services import customer_revoke_tokens


class Command(BaseCommand):
    help = "Revoke every token issued so far to a customer (issue_token gives a new one)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("customer_id", type=uuid.UUID)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            customer = customer_revoke_tokens(customer_id=options["customer_id"])
        except Customer.DoesNotExist as exc:
            raise CommandError(f"No customer {options['customer_id']}") from exc
        self.stdout.write(f"Revoked every earlier token of {customer.id}.")
