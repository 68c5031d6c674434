"""What every log line knows besides its message: the request, workflow and customer it belongs
to, ids only (never demographics).

The ids live in context variables: the request-id middleware (config/request_id.py) sets the
request's, authentication (merchant/auth.py, into merchant/context.py) the customer's, and the
Celery signals below a task's workflow. `ContextFilter`, on the console handler of LOGGING,
copies whichever are known onto each record, where either formatter prints them.

LOGGING names this module, so Django's logging set-up imports it in every process (web, worker,
beat, commands), and with it the Celery signal receivers.
"""

import logging
from contextvars import ContextVar
from typing import Any

from celery.signals import setup_logging, task_postrun, task_prerun
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# The request's customer is authentication's to know (merchant/context.py); printed here.
from merchant.context import customer_id as customer_id

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
workflow_id: ContextVar[str | None] = ContextVar("workflow_id", default=None)

CONTEXT_FIELDS = ("request_id", "workflow_id", "customer_id")


class BeatSendsFilter(logging.Filter):
    """Drops beat's INFO line per task it sends ("Scheduler: Sending due task ..."): periodic
    noise while nothing happens (LOGGING leaves it out at LOG_LEVEL=DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not str(record.msg).startswith(
            "Scheduler: Sending due task"
        )


class ContextFilter(logging.Filter):
    """Adds request_id, workflow_id and customer_id to a record, each only when known."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = request_id.get()
        if request is not None:
            record.request_id = request
        workflow = workflow_id.get()
        if workflow is not None:
            record.workflow_id = workflow
        customer = customer_id.get()
        if customer is not None:
            record.customer_id = str(customer)
        return True


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time, level, logger, message, the known ids, and exc_info when
    there is one. Other `extra` attributes are printed too, except Django's `request` object
    and Celery's `data` (a task's arguments and return value): neither belongs in a line."""
    return JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        reserved_attrs=[*RESERVED_ATTRS, "request", "data"],
    )


def text_formatter() -> logging.Formatter:
    """A plain line for local runs, with the same ids (`-` when unknown)."""
    return logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s "
        "request_id=%(request_id)s workflow_id=%(workflow_id)s customer_id=%(customer_id)s",
        defaults=dict.fromkeys(CONTEXT_FIELDS, "-"),
    )


# --- Celery ------------------------------------------------------------------------------------

_PROCESS_WORKFLOW = "workflows.process_workflow"  # the one-workflow message of before
_PROCESS_WORKFLOWS = "workflows.process_workflows"


@setup_logging.connect
def _keep_django_logging(loglevel: int | None = None, **_: Any) -> None:
    """With no receiver here, a worker or beat would replace the root logger's handlers with
    Celery's own plain-text ones (`worker_hijack_root_logger`), dropping LOG_FORMAT and the ids.
    Connected, Celery leaves Django's LOGGING in place; only the root level is taken from
    `--loglevel`, as Celery would have set it (the Procfile's INFO: the harnesses wait for the
    worker's "ready." line whatever LOG_LEVEL says)."""
    if loglevel:
        logging.getLogger().setLevel(loglevel)


@task_prerun.connect
def _task_context(
    task: Any = None,
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    # Set for every task (None for most), so a thread of the pool never keeps the previous
    # task's id. Only the message's id: no database read on the task's hot path.
    workflow_id.set(_workflow_of(task, args, kwargs))


@task_postrun.connect
def _task_context_end(**_: Any) -> None:
    workflow_id.set(None)


def _workflow_of(
    task: Any, args: tuple[Any, ...] | list[Any] | None, kwargs: dict[str, Any] | None
) -> str | None:
    name = getattr(task, "name", None)
    if name == _PROCESS_WORKFLOWS:
        # A batch's lines name their workflows themselves; a batch of one gets the context.
        ids = args[0] if args else (kwargs or {}).get("workflow_ids")
        value = ids[0] if isinstance(ids, list) and len(ids) == 1 else None
    elif name == _PROCESS_WORKFLOW:
        message = args[0] if args else (kwargs or {}).get("message")
        value = message.get("workflow-id") if isinstance(message, dict) else None
    else:
        return None
    return value if isinstance(value, str) else None
