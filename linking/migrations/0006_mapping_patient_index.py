"""A patient's mappings by (customer, patient) whatever their status, and no customer_id index
where a composite index starting with customer_id already serves.

link_record reads a patient's linked and de-linked mappings; with only the customer_id index and
the LINKED-only unique index, PostgreSQL read every mapping of the customer for each workflow
(1,500 rows per workflow in a 3,000-workflow `make bench` run). And with a customer_id index
beside (customer_id, key), the planner took the former for a fifth of the acks (read from
pg_stat_all_indexes in the same run), reading every idempotency record of the customer.

Built and dropped CONCURRENTLY (writes go on meanwhile), hence not atomic. Only the indexes are
dropped: Django's own AlterField would also drop and re-add the foreign keys, re-checking every
row.
"""

import django.db.models.deletion
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models

_DROPPED = [
    ("linking_patientmapping", "linking_patientmapping_customer_id_869d0b2d"),
    ("linking_idempotencyrecord", "linking_idempotencyrecord_customer_id_b7c65791"),
    ("linking_linkhistory", "linking_linkhistory_customer_id_142f46f9"),
]


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("linking", "0005_request_data_encrypted"),
        ("merchant", "0003_customer_webhook_secret_previous"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="patientmapping",
            index=models.Index(fields=["customer", "customer_patient_id"], name="mapping_patient"),
        ),
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX CONCURRENTLY IF EXISTS "{index}"',
                    reverse_sql=f'CREATE INDEX CONCURRENTLY "{index}" ON "{table}" ("customer_id")',
                )
                for table, index in _DROPPED
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="patientmapping",
                    name="customer",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="patient_mappings",
                        to="merchant.customer",
                    ),
                ),
                migrations.AlterField(
                    model_name="idempotencyrecord",
                    name="customer",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="idempotency_records",
                        to="merchant.customer",
                    ),
                ),
                migrations.AlterField(
                    model_name="linkhistory",
                    name="customer",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="link_history",
                        to="merchant.customer",
                    ),
                ),
            ],
        ),
    ]
