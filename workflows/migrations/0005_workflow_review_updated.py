# The sweep's expiry of undecided reviews reads REVIEW rows by age: built without locking the
# table against writes (a large workflow table stays writable while it builds).

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("workflows", "0004_drop_redundant_indexes"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="workflow",
            index=models.Index(
                condition=models.Q(("status", "REVIEW")),
                fields=["updated_at"],
                name="workflow_review_updated",
            ),
        ),
    ]
