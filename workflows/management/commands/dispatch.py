import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand

from workflows.dispatcher import Dispatcher


class Command(BaseCommand):
    help = (
        "Run the workflow dispatcher in the foreground until SIGTERM or SIGINT: it runs the "
        "scheduler, which publishes due work (workflows/scheduler.py). Every Celery worker "
        "already runs one; this is for a host without workers, or to watch it. Only one "
        "dispatcher leads at a time, whatever runs where."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        dispatcher = Dispatcher()

        def stop(*_: Any) -> None:
            dispatcher.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        # The loop on a thread, so that this one can say when it leads (another dispatcher may
        # hold the lock: a worker's) while the signals still reach the main thread.
        thread = threading.Thread(target=dispatcher.run, name="dispatcher")
        thread.start()
        self._say("dispatcher started")
        leading = False
        while thread.is_alive():
            thread.join(timeout=0.2)
            if dispatcher.leading.is_set() != leading:
                leading = not leading
                self._say("dispatcher leading" if leading else "dispatcher not leading")
        self._say(f"dispatcher stopped after publishing {dispatcher.published} workflows")

    def _say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()
