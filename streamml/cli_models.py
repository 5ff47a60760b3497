"""``streamml train`` and ``streamml models ...``: the model lifecycle from the command line.

Registered on the main app by :mod:`streamml.cli`; helpers come from there at call time.
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.table import Table

models_app = typer.Typer(help="The model registry: list, show, promote, rollback, archive.")


def _base() -> Any:
    from streamml import cli

    return cli


def _spec(name: str) -> Any:
    cli = _base()
    settings = cli._settings()
    return settings, cli._specs(settings, [name])[0]


def train(
    pipeline: str = typer.Argument(..., help="The pipeline whose batch model to train."),
    last_hours: float | None = typer.Option(None, help="Train on events of the last N hours."),
    last_events: int | None = typer.Option(None, help="Train on the last N labelled events."),
    since_ms: int | None = typer.Option(None, help="Events from this time (epoch ms) on."),
    until_ms: int | None = typer.Option(None, help="Events before this time (epoch ms)."),
    deploy: bool = typer.Option(
        True, help="Deploy per the evaluation (challenger, or archive); --no-deploy registers only."
    ),
) -> None:
    """Train the spec's batch model on features + labels from ClickHouse, evaluate it
    against the champion, export and check ONNX, register it and deploy per the decision."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from streamml import lifecycle
    from streamml.models.training import plan_trials

    cli = _base()
    settings, spec = _spec(pipeline)
    if since_ms is None and last_hours is not None:
        since_ms = int((time.time() - last_hours * 3600) * 1000)
    window = lifecycle.Window(since_ms, until_ms, last_events)

    def action() -> None:
        if spec.batch_model is None:
            from streamml.errors import TrainingError

            raise TrainingError(
                f"{pipeline}: the spec has no batch_model section",
                hint="add one (docs/pipeline-spec.md)",
            )
        trials = len(plan_trials(spec.batch_model))
        total = trials * spec.batch_model.epochs
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} epochs"),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            console=cli.console,
        ) as bar:
            task = bar.add_task(f"training {pipeline}", total=total, loss="")
            done: dict[int, int] = {}

            def progress(trial: int, epoch: int, train_loss: float, val_loss: float) -> None:
                done[trial] = epoch
                finished = sum(spec.batch_model.epochs if t < trial else e for t, e in done.items())
                bar.update(
                    task,
                    completed=min(finished, total),
                    loss=f"trial {trial}/{trials} loss {train_loss:.4f} val {val_loss:.4f}",
                )

            outcome = lifecycle.train_and_register(
                settings, spec, window, progress=progress, deploy=deploy
            )
            bar.update(task, completed=total)
        _print_outcome(outcome)

    cli._run(action)


def _print_outcome(outcome: Any) -> None:
    cli = _base()
    report, version = outcome.report, outcome.version
    table = Table(
        "metric",
        f"candidate {version.version}",
        f"champion {outcome.champion_version}",
        title=f"{version.pipeline}: test split, same rows",
    )
    champion = outcome.champion_metrics or {}
    for name, value in report.metrics.items():
        other = champion.get(name)
        table.add_row(name, f"{value:.4f}", "-" if other is None else f"{other:.4f}")
    cli.console.print(table)
    decision = report.decision
    cli.console.print(
        f"ONNX parity: max abs diff {outcome.parity_max_diff:.2e}; "
        f"decision: [bold]{'deploy' if decision and decision.deploy else 'keep the champion'}[/]"
        f" ({decision.reason if decision else ''}); now {outcome.deployed_as}"
    )
    cli.console.print(f"report: [bold]{outcome.report_dir}[/] (report.json, summary.md, PNGs)")


@models_app.command("list")
def list_models(pipeline: str = typer.Argument(...)) -> None:
    """Every registered version of a pipeline with its stage and test metrics."""
    from streamml.models.registry import Registry

    cli = _base()
    settings, spec = _spec(pipeline)
    registry = Registry.from_settings(settings)
    table = Table("version", "kind", "stage", "mode", "share", "created", "metrics")
    for mv in registry.list(spec.name):
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(mv.metrics.items())[:4])
        table.add_row(
            mv.version,
            mv.kind,
            mv.stage,
            mv.mode or "",
            f"{mv.traffic_share:.2f}",
            str(mv.created_at)[:19],
            metrics,
        )
    cli.console.print(table)


@models_app.command("show")
def show(pipeline: str = typer.Argument(...), version: str = typer.Argument(...)) -> None:
    """One version's metadata, and the pipeline's stage history."""
    from streamml.models.registry import Registry

    cli = _base()
    settings, spec = _spec(pipeline)

    def action() -> None:
        registry = Registry.from_settings(settings)
        mv = registry.get(spec.name, version)
        data = {**mv.to_row(), **mv.extra_columns(), "artifact": str(mv.artifact)}
        history = [h for h in registry.history(spec.name) if h.get("version") == version]
        cli.console.print_json(json.dumps({"version": data, "history": history}, default=str))

    cli._run(action)


@models_app.command("promote")
def promote(
    pipeline: str = typer.Argument(...),
    version: str | None = typer.Argument(None, help="Default: the one challenger."),
    reason: str = typer.Option("promoted from the CLI", help="Why (goes to the audit trail)."),
) -> None:
    """Make a version the champion; every worker swaps to it without a restart. Its
    signature, checksum and features are checked first: a bad artifact changes nothing."""
    from streamml import lifecycle
    from streamml.models.registry import Registry

    cli = _base()
    settings, spec = _spec(pipeline)

    def action() -> None:
        chosen = version
        if chosen is None:  # name the one challenger, so that it is verified like any other
            found = Registry.from_settings(settings).challengers(spec.name)
            chosen = found[0].version if len(found) == 1 else None
        cli._say(f"champion is now {lifecycle.promote(settings, spec, chosen, reason).version}")

    cli._run(action)


@models_app.command("rollback")
def rollback(
    pipeline: str = typer.Argument(...),
    reason: str = typer.Option("rolled back from the CLI", help="Why (audit trail)."),
) -> None:
    """Put the previous champion back; the current one is archived."""
    from streamml import lifecycle

    cli = _base()
    settings, spec = _spec(pipeline)
    cli._run(lambda: cli._say(f"now serving {lifecycle.rollback(settings, spec, reason)}"))


@models_app.command("archive")
def archive(
    pipeline: str = typer.Argument(...),
    version: str = typer.Argument(...),
    reason: str = typer.Option("archived from the CLI", help="Why (audit trail)."),
) -> None:
    """Retire a version (it stops shadowing or serving as a canary)."""
    from streamml import lifecycle

    cli = _base()
    settings, spec = _spec(pipeline)
    cli._run(
        lambda: cli._say(f"{lifecycle.archive(settings, spec, version, reason).version} archived")
    )


@models_app.command("challenger")
def challenger(
    pipeline: str = typer.Argument(...),
    version: str = typer.Argument(...),
    mode: str = typer.Option("shadow", help="shadow (logged, not served) or canary."),
    share: float | None = typer.Option(None, help="Canary: share of entities it serves."),
    reason: str = typer.Option("set from the CLI", help="Why (audit trail)."),
) -> None:
    """Run a version beside the champion, as a shadow or a canary."""
    from streamml import lifecycle

    cli = _base()
    settings, spec = _spec(pipeline)
    cli._run(
        lambda: cli._say(
            f"{lifecycle.set_challenger(settings, spec, version, mode, share, reason).version}"
            f" is a {mode} challenger"
        )
    )


def retrain(
    pipeline: str = typer.Argument(..., help="The pipeline to retrain."),
    reason: str = typer.Option("requested from the CLI", help="Why (audit trail)."),
) -> None:
    """Ask the trainer to retrain now: the same path as drift and the schedule."""
    from streamml import lifecycle

    cli = _base()
    settings, spec = _spec(pipeline)
    cli._run(
        lambda: cli._say(
            f"retrain requested ({lifecycle.request_retrain(settings, spec, reason).event_id}); "
            'follow it with `streamml query "SELECT ts, action, version, reason FROM '
            f"audit_events WHERE pipeline = '{spec.name}' ORDER BY ts\"`"
        )
    )


def trainer(
    pipeline: list[str] = typer.Option(
        [], "--pipeline", "-p", help="Pipeline(s) to serve (default: every spec in the folder)."
    ),
) -> None:
    """Run the trainer role and the alert rules on their own (e.g. beside a ClickHouse
    server); a worker with the sink runs them too unless STREAMML_TRAINER_ENABLED=false."""
    import asyncio
    import logging

    from streamml.agents.alerting import Alerting
    from streamml.agents.trainer import Trainer
    from streamml.streams.warehouse import run_query

    cli = _base()
    settings = cli._settings()
    specs = cli._specs(settings, pipeline)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(message)s")

    def query(text: str, parameters: dict[str, Any]) -> Any:
        return run_query(settings, text, parameters)

    async def main() -> None:
        await asyncio.gather(
            Trainer(settings, specs, query).run(), Alerting(settings, specs, query).run()
        )

    cli._say(f"trainer for {', '.join(s.name for s in specs)}; Ctrl-C stops it")
    try:
        cli._run(lambda: asyncio.run(main()))
    except KeyboardInterrupt:
        cli._say("trainer stopped")
