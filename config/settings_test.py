"""Settings for the test suite: the real PostgreSQL and Redis, on a Redis database of its own."""

import os

os.environ.setdefault("DEBUG", "false")
os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-use-0123456789")
os.environ.setdefault("REQUEST_DATA_KEYS", "test-only-request-data-key-0123456789")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("WEBHOOK_ALLOW_PRIVATE_HOSTS", "true")
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
# Test servers speak plain http on 127.0.0.1; the https redirect is tested on its own.
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
# The suite sends many requests per customer; the rate limit tests set low limits themselves.
os.environ.setdefault("RATE_LIMIT_LINK_CREATE", "100000/min")
os.environ.setdefault("RATE_LIMIT_READ", "100000/min")
os.environ.setdefault("RATE_LIMIT_LINK_BATCH", "100000/min")
# Tests change customers with queryset updates too (no signal): each request reads the row.
# tests/merchant/test_customer_cache.py turns the cache on.
os.environ.setdefault("CUSTOMER_CACHE_SECONDS", "0")

from config.settings import *  # noqa: F403

# WhiteNoise warns at start-up when the collected static folder is missing.
STATIC_ROOT.mkdir(exist_ok=True)  # noqa: F405
