"""HTTP healthchecks of the containers (docker/compose.yaml), run inside the image:

    python docker/healthcheck.py web [PATH]   GET http://127.0.0.1:$PORT/healthz (or PATH): 200
    python docker/healthcheck.py standin      GET the stand-in's /_control/stats: 200
    python docker/healthcheck.py receiver     GET the demo receiver's /_control/stats: 200

Exit 0 when healthy, 1 (with one line on stderr) when not. The slim image has no curl, and
this imports nothing but the standard library: it runs every few seconds and must stay cheap.
(Celery's worker and beat are checked with `celery inspect ping` instead.)
"""

import http.client
import os
import sys


def _host_header() -> str:
    """A name Django accepts (the first of ALLOWED_HOSTS): a probe of 127.0.0.1 would otherwise
    be refused with 400 wherever ALLOWED_HOSTS lists only the public name."""
    for host in os.environ.get("ALLOWED_HOSTS", "").split(","):
        host = host.strip().lstrip(".")
        if host and "*" not in host:
            return host
    return "localhost"


def check_http(port: int, path: str, headers: dict[str, str] | None = None) -> str | None:
    """None when GET `path` answers 200 (redirects are not followed), else what went wrong."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        status = conn.getresponse().status
    except OSError as exc:
        return f"GET {path}: {type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return None if status == 200 else f"GET {path}: HTTP {status}"


def check_web(path: str) -> str | None:
    # X-Forwarded-Proto: https, as a TLS proxy in front says it: with SECURE_SSL_REDIRECT and
    # TRUST_X_FORWARDED_PROTO on, a plain probe would only get the redirect.
    headers = {"Host": _host_header(), "X-Forwarded-Proto": "https"}
    return check_http(int(os.environ.get("PORT", "8000")), path, headers)


def main(argv: list[str]) -> int:
    what = argv[0] if argv else ""
    if what == "web":
        problem = check_web(argv[1] if len(argv) > 1 else "/healthz")
    elif what == "standin":
        problem = check_http(int(os.environ.get("STANDIN_PORT", "8001")), "/_control/stats")
    elif what == "receiver":
        problem = check_http(int(os.environ.get("RECEIVER_PORT", "9000")), "/_control/stats")
    else:
        print("usage: healthcheck.py web [PATH] | standin | receiver", file=sys.stderr)
        return 2
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
