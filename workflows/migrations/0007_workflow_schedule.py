import django.utils.timezone
from django.db import migrations, models

# The pending workflows at the upgrade join the schedule: those a live claim holds are in
# flight (the scheduler takes them back if that claim's lease ends); the others that a
# machine runs are due now (a message already queued for one finds it claimable as before).
# REVIEW waits for a person and REQUESTED for its search's callback: neither is due.
SCHEDULE_PENDING = """
UPDATE workflows_workflow
   SET published_at = CASE WHEN claimed_until > now() THEN now() END,
       due_at = CASE WHEN claimed_until > now() THEN NULL ELSE now() END
 WHERE status IN ('RECEIVED', 'IN_PROGRESS', 'LINKED', 'NO_RESULTS')
"""


class Migration(migrations.Migration):
    dependencies = [
        ("workflows", "0006_workflow_deadline_at"),
    ]

    operations = [
        migrations.AddField(
            model_name="workflow",
            name="due_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="workflow",
            name="published_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunSQL(SCHEDULE_PENDING, migrations.RunSQL.noop),
        # The default applies to rows made through the ORM (the ack writes due_at itself).
        migrations.AlterField(
            model_name="workflow",
            name="due_at",
            field=models.DateTimeField(blank=True, default=django.utils.timezone.now, null=True),
        ),
        migrations.AddIndex(
            model_name="workflow",
            index=models.Index(
                condition=models.Q(due_at__isnull=False),
                fields=["customer", "due_at"],
                name="workflow_due",
            ),
        ),
        migrations.AddIndex(
            model_name="workflow",
            index=models.Index(
                condition=models.Q(published_at__isnull=False),
                fields=["published_at"],
                name="workflow_in_flight",
            ),
        ),
    ]
