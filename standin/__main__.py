"""Command line entry point: ``python -m standin --port 8001``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from standin.server import DEFAULT_DATA, make_server
from standin.state import OUTAGES


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m standin", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 binds an ephemeral port")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="patients JSON file")
    parser.add_argument("--latency-ms", type=int, default=0, help="delay before $match and polls")
    parser.add_argument("--failure-rate", type=float, default=0.0, help="share of $match -> 500")
    parser.add_argument("--seed", type=int, default=0, help="seed of the failure sequence")
    parser.add_argument(
        "--async-delay-ms",
        type=int,
        default=0,
        help="how long async jobs stay pending; negative = until /_control/complete-jobs",
    )
    parser.add_argument(
        "--outage",
        choices=OUTAGES,
        default="",
        metavar="{503,hang}",
        help='start down: "503" answers every FHIR call 503, "hang" never answers (default: up)',
    )
    parser.add_argument("--token", default=env("STANDIN_TOKEN"), help="require this bearer token")
    parser.add_argument(
        "--callback-url",
        default=env("STANDIN_CALLBACK_URL"),
        help="async result callback URL template containing {search_id}",
    )
    parser.add_argument(
        "--callback-secret",
        default=env("STANDIN_CALLBACK_SECRET"),
        help="Standard Webhooks secret, whsec_<base64>",
    )
    return parser


def _stop(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM (docker stop, make's process cleanup) into the same clean exit as Ctrl-C.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        server = make_server(
            args.host,
            args.port,
            args.data,
            args.latency_ms,
            args.failure_rate,
            args.seed,
            async_delay_ms=args.async_delay_ms,
            token=args.token,
            callback_url=args.callback_url,
            callback_secret=args.callback_secret,
            outage=args.outage,
        )
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    signal.signal(signal.SIGTERM, _stop)
    print(f"standin listening on {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
