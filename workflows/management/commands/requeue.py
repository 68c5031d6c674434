import uuid
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from workflows.models import Workflow
from workflows.services import workflow_requeue


class Command(BaseCommand):
    help = "Re-queue workflows: FAILED -> RECEIVED, due at once; a pending one is made due at once."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("workflow_ids", nargs="+", type=uuid.UUID, metavar="WORKFLOW_ID")
        parser.add_argument("--reason", default="", help="kept in the workflow's timeline")

    def handle(self, *args: Any, **options: Any) -> None:
        errors = []
        for workflow_id in options["workflow_ids"]:
            try:
                workflow = workflow_requeue(
                    workflow_id=workflow_id, actor="command:requeue", reason=options["reason"]
                )
            except Workflow.DoesNotExist:
                errors.append(f"{workflow_id}: no such workflow")
            except ValueError as exc:
                errors.append(str(exc))
            else:
                self.stdout.write(f"{workflow.id}: re-queued ({workflow.status})")
        if errors:
            raise CommandError("; ".join(errors))
