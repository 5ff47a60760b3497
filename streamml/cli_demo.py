"""``streamml demo [tickets]``: the main job, and how its report is printed.

Registered on the main app by :mod:`streamml.cli`.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from streamml.cli import _fail, _run, _say, _settings, console
from streamml.config import Settings
from streamml.errors import ConfigError

DEMOS = ("demo", "payments", "tickets")  # payments: another name for the default demo


def demo(
    pipeline: str = typer.Argument(
        "demo",
        help="Which demo: demo (card payments, concept drift and the retraining loop) or "
        "tickets (support tickets: text features, weak labels, clusters, ask).",
    ),
    events: int | None = typer.Option(
        None, help="How many events to stream (default: 24,000 payments, 4,000 tickets)."
    ),
    keep_broker: bool = typer.Option(
        False, "--keep-broker", help="Leave the broker running if the demo started it."
    ),
) -> None:
    """The main job: stream a demo pipeline end to end and show what ClickHouse saw."""
    from rich.live import Live

    from streamml.demo import Tick, run_demo

    settings = _settings()
    if pipeline not in DEMOS:
        _fail(
            ConfigError(
                f"there is no demo for {pipeline!r}",
                hint="streamml demo (card payments) or streamml demo tickets (support tickets)",
            )
        )
    if pipeline == "tickets":
        _demo_tickets(settings, 4_000 if events is None else events, keep_broker)
        return
    live = Live(console=console, refresh_per_second=4)

    def on_tick(tick: Tick) -> None:
        acc = "-" if tick.rolling_accuracy is None else f"{tick.rolling_accuracy:.3f}"
        live.update(
            f"[bold]{tick.elapsed_s:5.0f} s[/]  produced {tick.produced:>6}  "
            f"scored {tick.scored:>6} ({tick.events_per_s:,.0f}/s)  learned {tick.learned:>6}  "
            f"rolling accuracy {acc}  in ClickHouse {tick.in_warehouse:>6}  "
            f"dead letters {tick.dead_letters}\n"
            f"       serving [bold]{tick.champion}[/]  drift detections {tick.drifts}  "
            f"trainer: {tick.trainer or 'idle'}"
        )

    def action() -> None:
        with live:
            n = 24_000 if events is None else events
            report = run_demo(settings, n, _say, on_tick, keep_broker=keep_broker)
        _print_demo(report)

    _run(action)


def _print_demo(report: Any) -> None:
    console.print(
        f"\n[bold green]demo finished[/] in {report.seconds:.0f} s: {report.events} events -> "
        f"{report.predictions} prediction rows + {report.dead_letter_rows} dead letters "
        "in ClickHouse"
    )
    if report.recovery is not None:
        rec = Table(
            "phase",
            "events",
            "served",
            "majority baseline",
            "best model not serving",
            title="served accuracy around the drift, on the same labelled events (ClickHouse)",
        )
        for phase in report.recovery.phases:
            shadow = (
                f"{phase.best_shadow_accuracy:.3f} ({phase.best_shadow})"
                if phase.best_shadow
                else "-"
            )
            rec.add_row(
                f"{phase.name} ({phase.first}-{phase.last})",
                str(phase.events),
                f"{phase.served:.3f}",
                f"{phase.baseline:.3f}",
                shadow,
            )
        console.print(rec)
        back = report.recovery.recovery_events
        console.print(
            "recovery: "
            + (
                f"served accuracy over 500 labelled events back at >= 0.85 {back} events "
                "after the change"
                if back is not None
                else "served accuracy never got back to 0.85 over 500 labelled events"
            )
        )
    table = Table("minute", "labeled", "accuracy", title="served accuracy per minute (event time)")
    for minute, n, accuracy in report.per_minute:
        table.add_row(str(minute), str(n), f"{accuracy:.3f}")
    console.print(table)
    lat = Table("figure", "ms", title="latency (from ClickHouse)")
    for name, value in report.latency.items():
        lat.add_row(name, f"{value:.2f}")
    console.print(lat)
    drift = Table("kind", "detector", "target", "detections", "first", title="drift (ClickHouse)")
    for row in report.drift_events:
        drift.add_row(*[str(v) for v in row])
    console.print(drift)
    audit = Table("at", "action", "version", "previous", "why", title="audit trail (ClickHouse)")
    for row in report.audit:
        audit.add_row(*[str(v) for v in row])
    console.print(audit)
    roles = Table("model version", "role", "labelled", "accuracy", title="champion vs challengers")
    for row in report.roles:
        roles.add_row(*[str(v) for v in row])
    console.print(roles)
    for command, output in report.cli:
        console.print(f"[bold]$ {command}[/]", highlight=False)
        console.print(output, highlight=False, markup=False)
    dlq = Table("error class", "rows", "example reason", title="dead letters")
    for error_class, n, example in report.dead_letters:
        dlq.add_row(str(error_class), str(n), str(example))
    console.print(dlq)
    _demo_ending(report, "demo")


def _demo_ending(report: Any, which: str) -> None:
    """The end of a demo's report: its picture, where its stack is, what was stopped."""
    if report.png:
        console.print(f"accuracy over time saved to [bold]{report.png}[/]")
    if report.state_dir:
        console.print(
            f"the demo's stack (broker data, ClickHouse, registry, reports) is in "
            f"{report.state_dir}; query it with STREAMML_STATE_DIR={report.state_dir} "
            f'streamml query "..." (it is replaced by the next {which} run)',
            highlight=False,
        )
    for line in report.stopped:
        console.print(f"[dim]{line}[/]")
    if report.left_running:
        console.print("[yellow]left running:[/] " + "; ".join(report.left_running))
    else:
        console.print("[green]nothing left running[/]")


def _demo_tickets(settings: Settings, events: int, keep_broker: bool) -> None:
    from rich.live import Live

    from streamml.demo_tickets import TicketsTick, run_tickets_demo

    live = Live(console=console, refresh_per_second=4)

    def on_tick(tick: TicketsTick) -> None:
        acc = "-" if tick.rolling_accuracy is None else f"{tick.rolling_accuracy:.3f}"
        drifts = ", ".join(f"{k} {v}" for k, v in sorted(tick.drifts.items())) or "none"
        live.update(
            f"[bold]{tick.elapsed_s:5.0f} s[/]  produced {tick.produced:>5}  "
            f"scored {tick.scored:>5} ({tick.events_per_s:,.0f}/s)  learned {tick.learned:>5}  "
            f"served accuracy (last 250 labelled) {acc}  in ClickHouse {tick.in_warehouse:>5}\n"
            f"       weak labels {tick.weak_labels:>5}  flags {tick.flags:>4}  "
            f"summaries {tick.summaries:>4}  new clusters {tick.new_clusters}  "
            f"drift detections: {drifts}  dead letters {tick.dead_letters}"
        )

    def action() -> None:
        with live:
            report = run_tickets_demo(settings, events, _say, on_tick, keep_broker=keep_broker)
        _print_demo_tickets(report)

    _run(action)


def _print_demo_tickets(report: Any) -> None:
    """The tickets demo's report (streamml.demo_tickets_report.TicketsReport)."""
    from streamml.models.tickets import NEW_PRODUCT

    new_at = report.new_product_at
    console.print(
        f"\n[bold green]tickets demo finished[/] in {report.seconds:.0f} s: {report.events} "
        f"tickets -> {report.good} answers + {report.bad} dead letters in ClickHouse; "
        f"{report.labelled} came with a label; the {NEW_PRODUCT} from ticket {new_at}"
    )
    console.print(f"served: {report.model}", highlight=False)
    acc = Table(
        "tickets",
        "labelled",
        "served",
        "majority baseline",
        "weak labels (given on)",
        title="accuracy on the labelled tickets: the online model that learns on the "
        "embeddings (served) and the zero-shot weak labels (ClickHouse)",
    )
    for b in report.buckets:
        mark = f"  <- {NEW_PRODUCT} from {new_at}" if b.first <= new_at <= b.last else ""
        weak = "-" if b.weak is None else f"{b.weak:.3f}"
        acc.add_row(
            f"{b.first}-{b.last}{mark}",
            str(b.labelled),
            f"{b.served:.3f}",
            f"{b.baseline:.3f}",
            f"{weak} ({b.weak_share:.0%})",
        )
    console.print(acc)
    console.print(
        f"served accuracy {report.served_accuracy:.3f} against a majority baseline of "
        f"{report.baseline:.3f}; weak labels (written at confidence >= "
        f"{report.weak_min_confidence:g}) on {report.weak_judged} of the {report.labelled} "
        f"labelled tickets, right on {report.weak_accuracy:.3f} of them"
    )
    roles = Table(
        "model version",
        "role",
        "labelled",
        "accuracy",
        title="every model, and the labeller (its top class, at any confidence), scored on "
        "the same labels (metrics)",
    )
    for row in report.roles:
        roles.add_row(*[str(v) for v in row])
    console.print(roles)
    _print_clusters(report)
    drift = Table(
        "kind", "detector", "target", "detections", "first at ticket", title="drift (ClickHouse)"
    )
    for kind, detector, target, n, first in report.drift:
        drift.add_row(kind, detector, target, str(n), str(first))
    console.print(drift)
    console.print(
        f"{report.flag_count} flags (served model and weak labeller confidently disagree); "
        f"of the {report.flags_labelled} with a true label, the served model was right on "
        f"{report.flags_served_right}, the weak label on {report.flags_weak_right}"
    )
    flags = Table("ticket", "served", "weak label", "true label", title="a few flags")
    for body, served, s_conf, weak, w_conf, label in report.flags:
        flags.add_row(body[:70], f"{served} ({s_conf:.2f})", f"{weak} ({w_conf:.2f})", label)
    console.print(flags)
    summaries = Table(
        "ticket",
        "summary",
        title=f"summaries ({report.summary_count} of {report.good} tickets, sampled)",
    )
    for event_id, summary, body in report.summaries:
        summaries.add_row(f"{event_id}: {body[:80]}", summary)
    console.print(summaries)
    if report.audit:
        audit = Table("at", "action", "version", "previous", "why", title="audit trail")
        for row in report.audit:
            audit.add_row(*[str(v) for v in row])
        console.print(audit)
    dlq = Table("error class", "rows", "example reason", title="dead letters")
    for error_class, n, example in report.dead_letters:
        dlq.add_row(str(error_class), str(n), str(example))
    console.print(dlq)
    command, output = report.ask
    if command:
        console.print(f"[bold]$ {command}[/]", highlight=False)
        console.print(output, highlight=False, markup=False)
    _demo_ending(report, "tickets demo")


def _print_clusters(report: Any) -> None:
    """The clusters that hold the new product's tickets, and those reported as new."""
    from collections import Counter

    from streamml.models.tickets import NEW_PRODUCT

    new_at, everything = report.new_product_at, report.clusters
    total = sum(c.new_product for c in everything)
    table = Table(
        "partition",
        "cluster",
        "tickets",
        "first ticket",
        NEW_PRODUCT,
        "top class (share)",
        "reported new at",
        title=f"clusters of the ticket texts: those with the {NEW_PRODUCT}'s tickets, and "
        "those reported new (each partition clusters its own tickets)",
    )
    for c in everything:
        if c.reported_at is None and c.new_product < 0.1 * total:
            continue
        table.add_row(
            str(c.partition),
            str(c.cluster),
            str(c.events),
            str(c.first),
            f"{c.new_product} ({c.new_product / c.events:.0%})",
            f"{c.top_class} ({c.top_share:.2f})",
            "-" if c.reported_at is None else f"ticket {c.reported_at}",
        )
    console.print(table)
    per_partition = Counter(c.partition for c in everything)
    opened_after = sum(c.new_product for c in everything if c.first >= new_at)
    at = [i for *_, i in report.new_clusters]
    console.print(
        f"{len(everything)} clusters in all ({', '.join(map(str, per_partition.values()))} per "
        f"partition); of the {total} {NEW_PRODUCT} tickets, {opened_after} went to clusters "
        f"opened at or after ticket {new_at}; {len(at)} new_cluster drift events at tickets "
        f"{at or '-'} ({sum(i >= new_at for i in at)} at or after ticket {new_at})",
        highlight=False,
    )
