import datetime as dt
import json
import math
import uuid
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from merchant.models import Customer
from merchant.services import (
    WEBHOOK_SECRET_OVERLAP_DEFAULT,
    WEBHOOK_SECRET_OVERLAP_MAX,
    customer_webhook_secret_rotate,
)

OVERLAP_HOURS_DEFAULT = WEBHOOK_SECRET_OVERLAP_DEFAULT / dt.timedelta(hours=1)
OVERLAP_HOURS_MAX = WEBHOOK_SECRET_OVERLAP_MAX / dt.timedelta(hours=1)


class Command(BaseCommand):
    help = (
        "Give a customer a new webhook signing secret; the old one keeps signing (a second "
        "signature) for --overlap-hours. Prints the new secret once."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("customer_id", type=uuid.UUID)
        parser.add_argument(
            "--overlap-hours",
            type=float,
            default=OVERLAP_HOURS_DEFAULT,
            help=(
                f"how long the old secret keeps signing (default {OVERLAP_HOURS_DEFAULT:g}; "
                f"0: it stops at once; at most {OVERLAP_HOURS_MAX:g})"
            ),
        )
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args: Any, **options: Any) -> None:
        hours: float = options["overlap_hours"]
        if not (math.isfinite(hours) and 0 <= hours <= OVERLAP_HOURS_MAX):
            raise CommandError(f"--overlap-hours must be between 0 and {OVERLAP_HOURS_MAX:g}.")
        customer_id: uuid.UUID = options["customer_id"]
        customer = Customer.objects.filter(id=customer_id).first()
        if customer is None:
            raise CommandError(f"No customer {customer_id}")
        try:
            secret = customer_webhook_secret_rotate(
                customer=customer,
                overlap=dt.timedelta(hours=hours),
                actor="command:rotate_webhook_secret",
            )
        except Customer.DoesNotExist as exc:  # deleted meanwhile
            raise CommandError(f"No customer {customer_id}") from exc
        # No previous secret left (overlap 0): the old one stopped with the rotation itself.
        stops_at = customer.webhook_secret_previous_until or customer.updated_at
        values = {
            "customer_id": str(customer.id),
            "webhook_secret": secret,
            "old_secret_stops_at": stops_at.isoformat(),
        }
        if options["json"]:
            self.stdout.write(json.dumps(values))
            return
        for name, value in values.items():
            self.stdout.write(f"{name}: {value}")
        self.stdout.write(
            "Give the new secret to the customer: it is shown once. Until the old one stops, "
            "every webhook carries a signature with each."
        )
