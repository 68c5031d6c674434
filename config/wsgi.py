"""WSGI entry point for gunicorn (`gunicorn config.wsgi`)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

application = get_wsgi_application()

# Compiled on first use otherwise, inside some customer's first POST /link to this process:
# Django's e-mail domain pattern (Unicode ranges under IGNORECASE) takes ~40 ms to compile here,
# once per process. Each gunicorn worker imports this module as it boots, before any request.
from django.core.validators import EmailValidator  # noqa: E402

EmailValidator.domain_regex.match("example.org")
