"""`python -m tests.fuzz [--max-examples N] [--seed S]`: the long fuzz run (`make fuzz`).

Starts the service on a fresh database, runs schemathesis with every check against it, prints
schemathesis's report and then the summary; exits 1 on any failure or error.
"""

from __future__ import annotations

import argparse
import sys

from tests.fuzz.driver import run_schemathesis
from tests.fuzz.stack import fuzz_target

# Per operation and phase. 500 takes a few minutes for the whole API.
DEFAULT_MAX_EXAMPLES = 500


def _server_errors(log: str) -> str:
    """The tracebacks gunicorn logged: what a 5xx was, on the server side."""
    blocks = [b for b in log.split("\n\n") if "Traceback" in b or " ERROR " in b]
    return "\n\n".join(blocks[-5:])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES)
    parser.add_argument("--seed", type=int, help="reproduce an earlier run")
    # One: schemathesis's workers are threads, and CPython 3.11's ast.parse (which hypothesis
    # calls to describe strategies) fails now and then under threads (CPython gh-106905).
    parser.add_argument("--workers", type=int, default=1, help="concurrent schemathesis workers")
    args = parser.parse_args()

    with fuzz_target() as target:
        print(f"fuzzing {target.base_url}", flush=True)
        summary = run_schemathesis(
            base_url=target.base_url,
            token=target.token,
            secret=target.secret,
            max_examples=args.max_examples,
            seed=args.seed,
            workers=args.workers,
        )
        server_errors = _server_errors(target.log.read_text(errors="replace"))
    if server_errors:
        print(f"\nserver-side errors logged by gunicorn (last 5):\n{server_errors}")
    print("\n" + summary.render(), flush=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
