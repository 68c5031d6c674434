"""The fuzz run: schemathesis's CLI against a running service, its JSON report as a summary.

The CLI rather than `schema.parametrize()`: it runs every phase (explicit examples, the coverage
phase's boundary and negative cases, random fuzzing, stateful sequences along the schema's
links) and the checks that need more than one request (unsupported methods, ignored auth).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.processes import BIN, ROOT

HOOKS_MODULE = "tests.fuzz.hooks"
CONFIG_FILE = Path(__file__).with_name("schemathesis.toml")
# The hooks sign the internal system's search callbacks with this (see hooks.py).
CALLBACK_SECRET_ENV = "FUZZ_CALLBACK_SECRET"
# The fuzzed customer's webhook URL, registered at onboarding.
REGISTERED_WEBHOOK_ORIGIN = "https://hooks.fuzz.example"
REGISTERED_WEBHOOK_URL = f"{REGISTERED_WEBHOOK_ORIGIN}/merchant"


def callback_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def server_settings(secret: str) -> dict[str, str]:
    """Settings of the gunicorn under test, on top of config.settings_test."""
    return {
        # The fuzzer is one customer sending thousands of requests: with the production limits
        # most would get 429 (documented and allowed) and test nothing else. Still enabled, so
        # the throttle runs on every request.
        "RATE_LIMIT_LINK_CREATE": "1000000/min",
        "RATE_LIMIT_READ": "1000000/min",
        "INTERNAL_CALLBACK_SECRET": secret,
    }


@dataclass(frozen=True)
class CheckFailure:
    code: str
    title: str
    count: int
    operations: list[str]


@dataclass
class FuzzSummary:
    exit_code: int
    operations_selected: int
    operations_tested: int
    test_cases: int
    seed: int | None
    seconds: float
    phases: dict[str, str]
    failures: list[CheckFailure]
    errors: list[str]
    warnings: dict[str, list[str]] = field(default_factory=dict)
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.failures and not self.errors

    @classmethod
    def from_report(cls, report: dict[str, Any], *, output: str = "") -> FuzzSummary:
        return cls(
            exit_code=int(report["exit_code"]),
            operations_selected=int(report["operations"]["selected"]),
            operations_tested=int(report["operations"]["tested"]),
            test_cases=int(report["test_cases"]["generated"]),
            seed=report.get("seed"),
            seconds=float(report["running_time"]),
            phases={name: str(p["status"]) for name, p in report["phases"].items()},
            failures=[
                CheckFailure(f["code"], f["title"], int(f["count"]), list(f["operations"]))
                for f in report["failures"]
            ],
            errors=[json.dumps(e, sort_keys=True) for e in report["errors"]],
            warnings={k: list(v) for k, v in report.get("warnings", {}).items() if v},
            output=output,
        )

    def render(self) -> str:
        phases = ", ".join(f"{name} {status}" for name, status in self.phases.items())
        lines = [
            f"fuzz: {self.operations_tested}/{self.operations_selected} operations, "
            f"{self.test_cases} test cases, {self.seconds:.0f} s, seed {self.seed}",
            f"phases: {phases}",
            "failures by check:" + ("" if self.failures else " none"),
        ]
        lines += [
            f"  {f.code} {f.title}: {f.count} ({', '.join(f.operations)})" for f in self.failures
        ]
        lines.append("errors:" + ("" if self.errors else " none"))
        lines += [f"  {error}" for error in self.errors]
        lines += [f"warning {name}: {', '.join(items)}" for name, items in self.warnings.items()]
        lines.append(
            f"verdict: {'PASS' if self.ok else 'FAIL'} (schemathesis exit {self.exit_code})"
        )
        return "\n".join(lines)


def run_schemathesis(
    *,
    base_url: str,
    token: str,
    secret: str,
    max_examples: int,
    seed: int | None = None,
    workers: int = 1,
    echo: bool = True,
    extra_args: list[str] | None = None,
) -> FuzzSummary:
    """Every operation, every check, positive and negative data, with the customer's token.

    `echo` streams the CLI's own report (each failure with a curl line to reproduce it);
    otherwise it is kept in `FuzzSummary.output`.
    """
    with tempfile.TemporaryDirectory(prefix="fuzz-") as workdir:
        report = Path(workdir) / "report.json"
        args = [
            str(BIN / "schemathesis"),
            "--config-file",
            str(CONFIG_FILE),
            "--no-color",
            "run",
            f"{base_url}/api/schema/",
            "--checks",
            "all",
            "--mode",
            "all",
            "--max-examples",
            str(max_examples),
            "--workers",
            str(workers),
            "--header",
            f"customer-token: {token}",
            # One failure does not end an operation's run: report every kind it finds.
            "--continue-on-failure",
            "--request-timeout",
            "15",
            "--generation-database",
            "none",
            "--report",
            "json",
            "--report-json-path",
            str(report),
            *(["--seed", str(seed)] if seed is not None else []),
            *(extra_args or []),
        ]
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": HOOKS_MODULE,
            "PYTHONPATH": pythonpath,
            CALLBACK_SECRET_ENV: secret,
        }
        started = time.monotonic()
        # cwd: schemathesis keeps .hypothesis/ and .schemathesis/ there, not in the repository.
        proc = subprocess.run(
            args,
            cwd=workdir,
            env=env,
            stdout=None if echo else subprocess.PIPE,
            stderr=None if echo else subprocess.STDOUT,
            text=True,
            check=False,
        )
        output = proc.stdout or ""
        if not report.exists():
            raise RuntimeError(
                f"schemathesis exited {proc.returncode} after {time.monotonic() - started:.0f} s "
                f"without a report:\n{output[-4000:]}"
            )
        summary = FuzzSummary.from_report(json.loads(report.read_text()), output=output)
        # The report's exit code and the process's agree; trust the process if they do not.
        summary.exit_code = summary.exit_code or proc.returncode
        return summary
