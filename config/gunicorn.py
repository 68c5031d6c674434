"""gunicorn's configuration (the Procfile's `web` line: `--config config/gunicorn.py`).

Only the multiprocess metrics' bookkeeping (config/metrics.py, docs/operations.md "Metrics");
every other option stays on the command line. Imports nothing of the project: the master serves
no request.
"""

import glob
import os
from typing import Any


def _multiproc_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def on_starting(server: Any) -> None:
    """Start from an empty directory: files of an earlier run (old pids) would be added to this
    run's counts for ever."""
    path = _multiproc_dir()
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    for name in glob.glob(os.path.join(path, "*.db")):
        os.remove(name)


def child_exit(server: Any, worker: Any) -> None:
    """A worker died or was replaced: drop its live gauges (its counters stay in the sums)."""
    if not _multiproc_dir():
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
