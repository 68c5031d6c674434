"""Schemathesis against the service's own OpenAPI schema, served by a real gunicorn.

`make fuzz` (`python -m tests.fuzz`) is the long run on a fresh database; `test_fuzz_short.py`
is the short one inside `make test`. Both fail on any check failure: a 5xx, a response the
schema does not describe, invalid data accepted, valid data refused, a request without its
token answered with anything but 401.
"""
