"""The targets of issues 7 and 18 and the table `make bench` prints. Targets are reported, not
enforced: a run that misses one still exits 0 (only a stage that could not run fails it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Issue 7, on a 2-core machine with the load generator on the same box.
ACK_MIN_RATIO = 0.20
ACK_MAX_P99_MS = 30.0
STATUS_MIN_RATIO = 0.50
# Issue 18: end to end against A of the same run, and the CPU it costs per workflow (ms).
E2E_MIN_RATIO = 0.10
E2E_MAX_P99_S = 2.0
CPU_MAX_MS = {"total": 6.0, "workers": 2.0, "postgres": 2.0}
SWEEP_MAX_SECONDS = 1.0
# Issue 19: a 1,000-item POST /link/batch acknowledged within this (the slowest of the stage's).
BATCH_MAX_SECONDS = 1.0
WEB_RSS_MAX_MIB = 120.0


@dataclass(frozen=True)
class Verdict:
    name: str
    target: str
    figure: str
    passed: bool | None  # None: not measured (the stage failed)

    @property
    def word(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "figure": self.figure,
            "pass": self.passed,
        }


def ratio(stages: dict[str, Any], name: str) -> float | None:
    """A stage's 2xx answers per second over A's."""
    a = stages.get("yardstick", {}).get("ok_per_second")
    figure = stages.get(name, {}).get("ok_per_second")
    if not a or figure is None:
        return None
    return round(figure / a, 3)


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    stages = results["stages"]
    found: list[Verdict] = []

    ack, ack_ratio = stages.get("ack"), ratio(stages, "ack")
    if ack is None or ack_ratio is None:
        found.append(Verdict("ack", _ACK_TARGET, "not measured", None))
    else:
        p99 = ack["latency_ms"]["p99"]
        passed = ack_ratio >= ACK_MIN_RATIO and p99 <= ACK_MAX_P99_MS and _no_errors(ack)
        figure = f"{ack_ratio:.2f} x A, p99 {p99:.1f} ms{_errors_note(ack)}"
        found.append(Verdict("ack", _ACK_TARGET, figure, passed))

    status, status_ratio = stages.get("status"), ratio(stages, "status")
    if status is None or status_ratio is None:
        found.append(Verdict("status", _STATUS_TARGET, "not measured", None))
    else:
        passed = status_ratio >= STATUS_MIN_RATIO and _no_errors(status)
        figure = f"{status_ratio:.2f} x A{_errors_note(status)}"
        found.append(Verdict("status", _STATUS_TARGET, figure, passed))

    e2e = stages.get("end_to_end")
    a = stages.get("yardstick", {}).get("ok_per_second")
    if e2e is None or not a:
        found.append(Verdict("end to end", _E2E_TARGET, "not measured", None))
    else:
        rate, p99 = e2e["workflows_per_second"], e2e["to_completed_s"]["p99"]
        complete = e2e["completed"] == e2e["posted"] and not e2e["timed_out"]
        figure = f"{rate / a:.3f} x A ({rate:.0f}/s), p99 {p99:.2f} s" + (
            "" if complete else f" ({e2e['completed']} of {e2e['posted']} completed)"
        )
        passed = complete and rate / a >= E2E_MIN_RATIO and p99 <= E2E_MAX_P99_S
        found.append(Verdict("end to end", _E2E_TARGET, figure, passed))
    for group, limit in CPU_MAX_MS.items():
        name = f"CPU {group}"
        ms = cpu_ms(e2e, group) if e2e is not None else None
        if ms is None:
            found.append(Verdict(name, f"<= {limit:g} ms per workflow", "not measured", None))
        else:
            found.append(
                Verdict(name, f"<= {limit:g} ms per workflow", f"{ms:.2f} ms", ms <= limit)
            )

    sweep = stages.get("sweep")
    if sweep is None:
        found.append(Verdict("sweep", _SWEEP_TARGET, "not measured", None))
    else:
        seconds = sweep["seconds"]
        found.append(
            Verdict("sweep", _SWEEP_TARGET, f"{seconds:.3f} s", seconds < SWEEP_MAX_SECONDS)
        )

    batch = stages.get("batch")
    if batch is None:
        found.append(Verdict("batch ack", _BATCH_TARGET, "not measured", None))
    else:
        figure = f"max {batch['max_s']:.3f} s, median {batch['median_s']:.3f} s"
        found.append(
            Verdict("batch ack", _BATCH_TARGET, figure, batch["max_s"] <= BATCH_MAX_SECONDS)
        )

    peak = results.get("rss", {}).get("web_worker_peak_mib")
    if peak is None:
        found.append(Verdict("web RSS", _RSS_TARGET, "not measured", None))
    else:
        found.append(Verdict("web RSS", _RSS_TARGET, f"{peak:.0f} MiB", peak < WEB_RSS_MAX_MIB))
    return found


_ACK_TARGET = f">= {ACK_MIN_RATIO:.2f} x A, p99 <= {ACK_MAX_P99_MS:.0f} ms"
_STATUS_TARGET = f">= {STATUS_MIN_RATIO:.2f} x A"
_E2E_TARGET = f">= {E2E_MIN_RATIO:.2f} x A, p99 <= {E2E_MAX_P99_S:g} s"
_SWEEP_TARGET = f"< {SWEEP_MAX_SECONDS:.0f} s"
_BATCH_TARGET = f"1,000 items in <= {BATCH_MAX_SECONDS:g} s"
_RSS_TARGET = f"< {WEB_RSS_MAX_MIB:.0f} MiB per web worker"


def cpu_ms(e2e: dict[str, Any], group: str) -> float | None:
    """CPU per completed workflow of one process group, or of all of them ("total")."""
    per = e2e["cpu_ms_per_workflow"]
    if group == "total":
        return round(sum(per.values()), 2)
    return per.get(group)


def _errors(stage: dict[str, Any]) -> int:
    socket = sum(v for k, v in stage["socket_errors"].items() if k != "status")
    return int(stage["non2xx"]) + socket


def _no_errors(stage: dict[str, Any]) -> bool:
    return _errors(stage) == 0


def _errors_note(stage: dict[str, Any]) -> str:
    count = _errors(stage)
    return f", {count} errors" if count else ""


# --- the table ---------------------------------------------------------------------------------

_WEB_STAGES = (
    ("yardstick", "A: yardstick (no I/O)"),
    ("ack", "POST /link (ack)"),
    ("status", "GET /link/status"),
)


def render(results: dict[str, Any]) -> str:
    stages = results["stages"]
    machine = results.get("machine", {})
    config = results.get("config", {})
    lines = [
        f"Merchant Service benchmark, {results.get('started_at', '')}",
        f"machine: {machine.get('cores')} cores ({machine.get('cpu')}), "
        f"{machine.get('memory_gib')} GiB; load average at start {machine.get('load_average')}",
        f"stack: gunicorn {config.get('web_workers')} sync workers, "
        f"{config.get('celery_workers')} Celery worker(s) as in the Procfile, stand-in "
        f"{config.get('standin_latency_ms')} ms; wrk {config.get('threads')} threads x "
        f"{config.get('connections')} connections, {config.get('duration'):g} s per web stage",
        "",
    ]
    header = (
        f"{'stage':<24}{'2xx/s':>9}{'x A':>7}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'CPU s web':>11}{'wrk':>7}{'pg':>7}{'redis':>7}{'disp':>7}{'box %':>7}"
        f"{'web ms/req':>12}"
        f"{'web MiB':>9}"
    )
    lines += [header, "-" * len(header)]
    for key, label in _WEB_STAGES:
        stage = stages.get(key)
        if stage is None:
            lines.append(f"{label:<24}{'(not measured: see errors)':>40}")
            continue
        cpu = stage["cpu_seconds"]
        share = ratio(stages, key)
        lines.append(
            f"{label:<24}{stage['ok_per_second']:>9.0f}"
            f"{(f'{share:.2f}' if share is not None else '-'):>7}"
            f"{stage['latency_ms']['p50']:>9.1f}{stage['latency_ms']['p99']:>9.1f}"
            f"{_errors(stage):>8}{cpu['web']:>11.1f}{cpu['wrk']:>7.1f}"
            f"{cpu['postgres']:>7.1f}{cpu['redis']:>7.1f}{cpu.get('dispatcher', 0.0):>7.1f}"
            f"{_busy_percent(stage['machine_cpu_seconds']):>7}"
            f"{stage['server_cpu_ms_per_request'] or 0:>12.2f}"
            f"{max(stage['web_peak_rss_mib'], default=0):>9.0f}"
        )
        if stage["statuses"]:
            lines.append(f"{'':<24}non-2xx by status: {stage['statuses']}")
        if "messages_published" in stage:
            lines.append(
                f"{'':<24}{stage['messages_published']} queue messages published (wrk counted "
                f"{stage['ok']} answers; requests in flight at its end are not counted)"
            )
    lines.append("")

    e2e = stages.get("end_to_end")
    if e2e is not None:
        a = stages.get("yardstick", {}).get("ok_per_second")
        of_a = f" ({e2e['workflows_per_second'] / a:.3f} x A)" if a else ""
        lines.append(
            f"end to end: {e2e['completed']} of {e2e['posted']} workflows COMPLETED in "
            f"{e2e['seconds']:.1f} s = {e2e['workflows_per_second']:.0f} workflows/s{of_a}; "
            f"202 -> COMPLETED p50 {e2e['to_completed_s']['p50']:.2f} s, "
            f"p99 {e2e['to_completed_s']['p99']:.2f} s; webhooks delivered "
            f"{e2e['webhooks_delivered']} (p99 {_seconds(e2e['to_webhook_s']['p99'])} after "
            "the 202)"
        )
        lines.append(
            "  CPU s: "
            + ", ".join(f"{name} {seconds:.1f}" for name, seconds in e2e["cpu_seconds"].items())
            + "; per workflow ms: "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in e2e["cpu_ms_per_workflow"].items())
            + f"; machine busy {_busy_percent(e2e['machine_cpu_seconds'])}%, of which "
            f"{e2e['machine_cpu_seconds']['rest']:.1f} s outside these processes"
        )
        lines.append(
            f"  peak RSS: web workers {_mib(e2e['web_peak_rss_mib'])}, Celery workers "
            f"{_mib(e2e['celery_worker_peak_rss_mib'])}"
        )
        beats = e2e.get("heartbeats")
        if beats is not None:
            lines.append(
                f"  claim heartbeats: {beats['statements']:.0f} statements renewed"
                f" {beats['renewed']:.0f} claims; {beats['cpu_seconds'] * 1000:.1f} ms thread CPU"
                f" + {beats['statement_seconds'] * 1000:.1f} ms statement time ="
                f" {beats['ms_per_workflow']:.4f} ms per workflow (target <= 0.1)"
            )
    lines += _fairness_lines(stages.get("fairness"))
    lines += _scaling_table(stages)
    batch = stages.get("batch")
    if batch is not None:
        lines.append(
            f"batch: {batch['batches']} x POST /link/batch of {batch['items']:,} items "
            f"({batch['body_bytes'] / 1024:.0f} KiB each), 202 after "
            + ", ".join(f"{s:.3f}" for s in batch["seconds"])
            + " s"
        )
    sweep = stages.get("sweep")
    if sweep is not None:
        lines.append(
            f"sweep: {sweep['rows']:,} rows ({sweep['table_size']}), {sweep['stale']:,} stale: "
            f"{sweep['seconds']:.3f} s, {sweep['requeued']} re-queued and checked in the "
            f"database, {sweep['failed']} failed (COPY load {sweep['load_seconds']:.1f} s)"
        )
    rss = results.get("rss", {})
    if rss:
        lines.append(
            f"peak RSS (VmHWM) over the stages: web worker {_mib(rss.get('web_worker_peak_mib'))}"
            f", Celery worker {_mib(rss.get('celery_worker_peak_mib'))}, gunicorn master "
            f"{_mib(rss.get('web_master_mib'))}"
        )
    lines.append("")

    found = verdicts(results)
    lines.append(f"{'target':<12}{'wanted':<36}{'measured':<40}verdict")
    for verdict in found:
        lines.append(f"{verdict.name:<12}{verdict.target:<36}{verdict.figure:<40}{verdict.word}")
    for stage, message in results.get("errors", {}).items():
        lines.append(f"ERROR in {stage}: {message.splitlines()[-1] if message else ''}")
    return "\n".join(lines)


def _fairness_lines(fair: dict[str, Any] | None) -> list[str]:
    """Customer B's single links idle and under customer A's backlog, and A's drain."""
    if fair is None:
        return []
    backlog = fair["a_backlog"]
    idle, under, ratio = fair["b_idle"], fair["b_under_backlog"], fair["ratio"]
    unended = under["a_unended_at_post"]

    def spread(phase: dict[str, Any]) -> str:
        return (
            f"{phase['completed']:>3} of {phase['links']:>3} COMPLETED: p50 "
            f"{_seconds(phase['p50'])}, p99 {_seconds(phase['p99'])}, max "
            f"{_seconds(phase['max'])} (202 -> claimed p50 {_seconds(phase['to_claimed_s']['p50'])}"
            f", max {_seconds(phase['to_claimed_s']['max'])})"
        )

    lines = [
        "",
        "fairness: customer B's single POST /link, 202 -> COMPLETED (from the workflow rows), "
        f"{fair['celery_workers']} Celery worker(s), at most {fair['in_flight_bound']} "
        "workflows in flight",
        f"  B idle:              {spread(idle)}",
        f"  B under A's backlog: {spread(under)}",
        f"  {'':<21}A had {unended['min']:,}-{unended['max']:,} workflows unended at B's "
        f"posts (median {unended['median']:,})",
        "  under backlog / idle: "
        + ", ".join(f"{key} {_times(ratio[key])}" for key in ("p50", "p99", "max"))
        + f" (first come, first served: ~{_seconds(fair['fifo_wait_estimate_s'])} behind "
        "A's median work left, at A's pace)",
        f"  A's backlog: {backlog['items']:,} items due at once ({backlog['batches']} x POST "
        f"/link/batch, 202 after {max(backlog['ack_s'], default=0):.2f} s at most), "
        + ("drained" if backlog["drained"] else "NOT drained")
        + f": {backlog['completed']:,} COMPLETED in {backlog['drain_s']:.1f} s from its first "
        f"claim = {backlog['workflows_per_second']:.0f}/s",
    ]
    if fair["abandoned"]:
        lines.append(f"  {fair['abandoned']} workflows left unended, failed by the harness")
    return lines


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


_SCALING_GROUPS = ("workers", "postgres", "web", "total")


def _scaling_table(stages: dict[str, Any]) -> list[str]:
    """End to end by batch size and worker processes: the main stage and the scaling runs."""
    scaling = stages.get("scaling")
    e2e = stages.get("end_to_end")
    if not scaling or e2e is None:
        return []
    runs = dict(scaling["runs"])
    default = {"batch": scaling["default_batch"], **e2e}
    runs[f"batch {default['batch']}, {e2e['celery_workers']} workers"] = default
    header = (
        f"  {'batch':>5}{'workers':>8}{'wf/s':>8}{'p50 s':>8}{'p99 s':>8}   CPU ms/workflow:"
        + "".join(f"{group:>10}" for group in _SCALING_GROUPS)
    )
    lines = ["", "scaling (end to end; each row its own run):", header]
    for run in sorted(runs.values(), key=lambda r: (r["celery_workers"], r["batch"])):
        lines.append(
            f"  {run['batch']:>5}{run['celery_workers']:>8}{run['workflows_per_second']:>8.0f}"
            f"{run['to_completed_s']['p50']:>8.2f}{run['to_completed_s']['p99']:>8.2f}"
            + " " * 19
            + "".join(f"{cpu_ms(run, group) or 0:>10.2f}" for group in _SCALING_GROUPS)
        )
    return [*lines, ""]


def _busy_percent(machine: dict[str, float]) -> str:
    """How busy the whole machine was (all cores), the processes above or not."""
    total = machine["busy"] + machine["idle"]
    return f"{100 * machine['busy'] / total:.0f}" if total else "-"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _mib(values: Any) -> str:
    if not values:
        return "-"
    if isinstance(values, list):
        return f"max {max(values):.0f} MiB (" + ", ".join(f"{v:.0f}" for v in values) + ")"
    return f"{values:.0f} MiB"
