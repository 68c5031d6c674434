"""Link processing (the consumer side of seed 3.3): filled in by the processing issue."""

import logging

logger = logging.getLogger(__name__)


def link_process(*, workflow_id: str) -> None:
    raise NotImplementedError
