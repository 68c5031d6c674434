"""GET /links' index: a customer's mappings, newest change first (keyset on updated_at, id).

Without it each page read and sorted every mapping of the customer. Built CONCURRENTLY (writes
go on meanwhile), hence not atomic.
"""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("linking", "0008_link_batch"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="patientmapping",
            index=models.Index(fields=["customer", "-updated_at", "-id"], name="mapping_listing"),
        ),
    ]
