"""Keep token_verify's per-process customer cache honest about changes made in this process."""

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from merchant.models import Customer
from merchant.services import customer_cache_forget


@receiver(post_save, sender=Customer)
@receiver(post_delete, sender=Customer)
def _customer_changed(sender: type[Customer], instance: Customer, **kwargs: Any) -> None:
    customer_id = instance.id
    customer_cache_forget(customer_id=customer_id)
    # Again once committed: a request in another thread may have cached the row as it was
    # before this transaction committed.
    transaction.on_commit(lambda: customer_cache_forget(customer_id=customer_id))
