"""The ``streamml`` command line (typer). Every command builds Settings first, so a bad
setting fails before anything starts, with a message naming the variable."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from streamml import __version__
from streamml.config import Settings, env_name, load_settings
from streamml.errors import ConfigError, StreamMLError

app = typer.Typer(
    help="streamml: real-time machine learning on Kafka.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _fail(exc: StreamMLError) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
    if exc.hint:
        err_console.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
    raise typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        _fail(exc)


def _run(action: Callable[[], None]) -> None:
    try:
        action()
    except StreamMLError as exc:
        _fail(exc)


def _say(text: str) -> None:
    console.print(f"[dim]·[/] {text}", highlight=False)


@app.command()
def version() -> None:
    """Print the streamml version."""
    console.print(__version__)


@app.command()
def config(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    reference: bool = typer.Option(
        False, "--reference", help="Print the markdown reference of every setting."
    ),
) -> None:
    """Print the effective configuration (secrets masked) and where each value is set."""
    if reference:
        from streamml.config import reference_markdown

        sys.stdout.write(reference_markdown())
        return
    settings = _settings()
    values = settings.effective()
    if as_json:
        console.print_json(json.dumps(values, default=str))
        return
    table = Table(title="streamml configuration", show_lines=False)
    table.add_column("setting", no_wrap=True)
    table.add_column("value")
    table.add_column("variable", no_wrap=True)
    for name, value in values.items():
        table.add_row(name, "" if value is None else str(value), env_name(name))
    console.print(table)


@app.command()
def up() -> None:
    """Start the local Kafka broker (fetching its jars once) unless one is configured."""
    from streamml.devstack import LocalBroker

    settings = _settings()

    def action() -> None:
        status = LocalBroker(settings, progress=_say).up()
        if status.state == "external":
            reach = "reachable" if status.ready else "NOT reachable"
            console.print(
                f"using the configured broker {status.bootstrap} ({reach}); nothing started"
            )
            return
        console.print(
            f"[green]Kafka broker ready[/] at {status.bootstrap} (pid {status.pid}); "
            f"data {status.data_dir}; log {status.log_file}"
        )

    _run(action)


@app.command()
def fetch() -> None:
    """Fetch the Kafka broker jars into the cache now (`up` does it when needed)."""
    from streamml.devstack.jars import ensure_kafka_jars

    settings = _settings()
    if not settings.uses_local_broker:
        console.print(f"using the configured broker {settings.bootstrap_servers}; nothing to fetch")
        return

    def action() -> None:
        libs = ensure_kafka_jars(
            settings.kafka_version, settings.cache_dir, settings.kafka_libs_dir, _say
        )
        console.print(f"Kafka {settings.kafka_version} jars ready in {libs}")

    _run(action)


@app.command()
def down() -> None:
    """Stop the local Kafka broker this state dir started (its data is kept)."""
    from streamml.devstack import LocalBroker

    settings = _settings()
    _run(lambda: console.print(LocalBroker(settings, progress=_say).down()))


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the broker (running, stopped, stale or external) and the warehouse in use."""
    from streamml.config import mask_dsn
    from streamml.devstack import LocalBroker

    settings = _settings()
    broker = LocalBroker(settings).status()
    info: dict[str, Any] = {
        "broker": broker.state,
        "bootstrap": broker.bootstrap,
        "ready": broker.ready,
        "pid": broker.pid,
        "kafka_version": broker.version,
        "uptime_s": None if broker.uptime_s is None else round(broker.uptime_s, 1),
        "data_dir": broker.data_dir,
        "log_file": broker.log_file,
        "warehouse": mask_dsn(settings.warehouse_dsn),
        "database": settings.clickhouse_database,
    }
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(show_header=False, title="streamml status")
    for key, value in info.items():
        if value is not None:
            table.add_row(key, str(value))
    console.print(table)
    if broker.state == "stale":
        console.print("[yellow]the broker's pid file is stale; `streamml up` starts a new one[/]")


@app.command()
def query(
    sql: str = typer.Argument(..., help="A ClickHouse SQL query."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format."),
) -> None:
    """Run a SQL query against the warehouse and print the result."""
    from streamml.streams.warehouse import Warehouse

    settings = _settings()

    def action() -> None:
        with Warehouse.connect(settings) as warehouse:
            result = warehouse.query(sql)
        if fmt is OutputFormat.json:
            rows = [dict(zip(result.columns, row, strict=True)) for row in result.rows]
            sys.stdout.write(json.dumps(rows, default=_jsonable) + "\n")
        elif fmt is OutputFormat.csv:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(result.columns)
            writer.writerows(result.rows)
            sys.stdout.write(buffer.getvalue())
        else:
            table = Table(*result.columns)
            for row in result.rows:
                table.add_row(*("" if v is None else str(v) for v in row))
            console.print(table)
            console.print(f"[dim]{len(result.rows)} row(s)[/]")

    _run(action)


def _jsonable(value: object) -> object:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


@app.command()
def worker() -> None:
    """Run a Faust worker for the configured app in the foreground."""
    from streamml.app import create_app, run_worker
    from streamml.devstack.broker import probe_metadata

    settings = _settings()
    if not probe_metadata(settings.bootstrap_servers, settings.request_timeout_s):
        _fail(
            StreamMLError(
                f"no Kafka broker answers at {settings.bootstrap_servers}",
                hint="start the local one with `streamml up` or set STREAMML_KAFKA_BOOTSTRAP",
            )
        )
    run_worker(create_app(settings), settings.log_level)


@app.command()
def demo(
    keep_broker: bool = typer.Option(
        False, "--keep-broker", help="Leave the broker running if the demo started it."
    ),
) -> None:
    """The main job: run the end-to-end flow on the embedded default stack and report it."""
    from streamml.demo import run_smoke

    settings = _settings()

    def action() -> None:
        report = run_smoke(settings, _say, keep_broker=keep_broker)
        table = Table("step", "ms", "what happened", title="streamml smoke flow")
        for name, ms, detail in report.steps:
            table.add_row(name, f"{ms:.0f}", detail)
        console.print(table)
        if report.broker_left_running:
            console.print(
                f"[yellow]left running:[/] the Kafka broker at {settings.bootstrap_servers} "
                "(`streamml down` stops it)"
            )
        else:
            console.print("[green]done;[/] nothing left running")

    _run(action)


def main() -> None:
    app()
