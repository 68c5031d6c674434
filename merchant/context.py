"""The customer the current request was authenticated as, for whoever reports on the request.

Set by authentication (merchant/auth.py), cleared per request by config/request_id.py, printed
on every log line by config/log_context.py. A module of its own, free of models: the logging
set-up imports it before Django's apps are loaded.
"""

import uuid
from contextvars import ContextVar

# The UUID itself: formatted only when a line is actually written, not on every request.
customer_id: ContextVar[uuid.UUID | None] = ContextVar("customer_id", default=None)
