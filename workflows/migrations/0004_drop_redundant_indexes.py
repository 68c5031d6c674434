"""Workflows by (customer, patient) instead of (customer, status), and no index on a foreign
key that a composite index starting with it already serves: workflow.customer_id
(workflow_customer_patient) and workflowtransition.workflow_id (transition_workflow_at).

The acks' "nothing pending for this patient" check is meant for the partial unique index on
(customer_id, patient_id); in a `make bench` run (pg_stat_all_indexes) the planner took the
customer_id index for a fifth of them and, once that was gone, (customer_id, status) for a
quarter, each time reading every (pending) workflow of the customer. Now every index that starts
with customer_id goes on to patient_id, and any choice reads one patient's rows. And every index
of a workflow row is written again at each of its status changes.

Dropped CONCURRENTLY (writes go on meanwhile), hence not atomic. Only the indexes are dropped:
Django's own AlterField would also drop and re-add the foreign keys, re-checking every row.
"""

import django.db.models.deletion
from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations, models

_DROPPED = [
    ("workflows_workflow", "customer_id", "workflows_workflow_customer_id_32a96a80"),
    (
        "workflows_workflowtransition",
        "workflow_id",
        "workflows_workflowtransition_workflow_id_9a70f438",
    ),
]


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("merchant", "0003_customer_webhook_secret_previous"),
        ("workflows", "0003_review_state"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="workflow",
            index=models.Index(fields=["customer", "patient_id"], name="workflow_customer_patient"),
        ),
        RemoveIndexConcurrently(model_name="workflow", name="workflow_customer_status"),
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX CONCURRENTLY IF EXISTS "{index}"',
                    reverse_sql=f'CREATE INDEX CONCURRENTLY "{index}" ON "{table}" ("{column}")',
                )
                for table, column, index in _DROPPED
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="workflow",
                    name="customer",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="workflows",
                        to="merchant.customer",
                    ),
                ),
                migrations.AlterField(
                    model_name="workflowtransition",
                    name="workflow",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="transitions",
                        to="workflows.workflow",
                    ),
                ),
            ],
        ),
    ]
