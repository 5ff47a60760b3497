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
    """Fetch the Kafka broker jars into the cache now (`up` does it when needed), and check
    the packaged language models and export the int8 text encoder (workers do it when a
    spec first needs it)."""
    from streamml.devstack.jars import ensure_kafka_jars
    from streamml.models.embeddings import export_int8
    from streamml.models.weights import WEIGHTS, verified

    settings = _settings()

    def action() -> None:
        if settings.uses_local_broker:
            libs = ensure_kafka_jars(
                settings.kafka_version, settings.cache_dir, settings.kafka_libs_dir, _say
            )
            console.print(f"Kafka {settings.kafka_version} jars ready in {libs}")
        else:
            console.print(f"using the configured broker {settings.bootstrap_servers}")
        for name in WEIGHTS:
            verified(name)
        console.print(f"language-model weights verified ({', '.join(sorted(WEIGHTS))})")
        _say("exporting the MiniLM text encoder to int8 ONNX (once; cached) ...")
        console.print(f"text encoder ready: {export_int8(settings.cache_dir)}")

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
    """Run a read-only SQL query against the warehouse and print the result.

    It is checked and run as the worker's /query does (reads only: writes, DDL and table
    functions that reach files are refused). With embedded chDB owned by a running worker,
    the query goes through that worker's /query (with the token of STREAMML_QUERY_TOKEN /
    _FILE / the secrets dir)."""
    from streamml import querysafety
    from streamml.errors import WarehouseLockedError
    from streamml.queryclient import query_worker
    from streamml.streams.warehouse import QueryResult, Warehouse

    settings = _settings()

    def run_query() -> QueryResult:
        try:
            with Warehouse.connect(settings) as warehouse:
                return querysafety.run_read_only(
                    warehouse.query, sql, table_functions=settings.query_table_functions
                )
        except WarehouseLockedError as locked:
            try:
                columns, rows = query_worker(settings, sql, max(60.0, settings.request_timeout_s))
            except StreamMLError:  # the worker answered: refused (what to set) or failed
                raise
            except OSError:  # no worker of ours answers: someone else holds the lock
                raise locked from None
            return QueryResult(columns, [tuple(row) for row in rows])

    def action() -> None:
        result = run_query()
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
            _print_table(result)

    _run(action)


@app.command()
def ask(
    question: str = typer.Argument(..., help="A question, e.g. 'drift events in the last day'."),
    pipeline: str | None = typer.Option(
        None, "--pipeline", "-p", help="The pipeline (default: the one named, or the only one)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (template, SQL, rows)."),
) -> None:
    """Answer a question about a pipeline with a vetted, read-only query (docs/ask.md).

    The question is matched by meaning to a catalogue of parameterized queries; the SQL
    that ran is printed with its parameters. A question that fits none of them, or asks
    to change data, is refused with what can be asked."""
    import textwrap
    from collections.abc import Iterator
    from contextlib import contextmanager

    from streamml import ask as asking
    from streamml import sql
    from streamml.errors import WarehouseLockedError
    from streamml.models.embeddings import Embedder, load_encoder
    from streamml.queryclient import query_worker
    from streamml.streams.warehouse import QueryResult, Warehouse

    settings = _settings()
    early = asking.refusal(question)  # before loading specs and the encoder
    if early is not None:
        _fail(early.error())
    names = [spec.name for spec in _specs(settings, [])]

    @contextmanager
    def reader() -> Iterator[Callable[[sql.Query], QueryResult]]:
        try:
            warehouse = Warehouse.connect(settings)
        except WarehouseLockedError as exc:  # a worker owns the embedded chDB: its /query
            locked = exc
        else:
            with warehouse:
                tf = settings.query_table_functions
                yield lambda query: asking.run_read_only(warehouse.query, query, tf)
            return

        def via_worker(query: sql.Query) -> QueryResult:
            timeout_s = max(60.0, settings.request_timeout_s)
            try:
                columns, rows = query_worker(settings, query.render(), timeout_s)
            except StreamMLError:
                raise
            except OSError:  # no worker of ours answers: someone else holds the lock
                raise locked from None
            return QueryResult(columns, [tuple(row) for row in rows])

        yield via_worker

    def action() -> None:
        embedder = Embedder(load_encoder(settings.cache_dir, device="cpu"))
        found = asking.plan(question, embedder, names, dt.datetime.now(dt.UTC), pipeline)
        if isinstance(found, asking.Refusal):
            raise found.error()
        query = found.query
        with reader() as run:
            if query.parameters.get("version"):
                known = run(sql.ask_known_versions(str(query.parameters["pipeline"])))
                unknown = asking.check_version(query, [str(row[0]) for row in known.rows])
                if unknown is not None:
                    raise unknown.error()
            result = run(query)
        if as_json:
            rows = [dict(zip(result.columns, row, strict=True)) for row in result.rows]
            answer = {
                "template": found.template.id,
                "description": found.template.description,
                "cosine": round(found.score, 4),
                "notes": list(found.notes),
                "sql": textwrap.dedent(query.text).strip(),
                "parameters": query.parameters,
                "columns": result.columns,
                "rows": rows,
            }
            sys.stdout.write(json.dumps(answer, default=_jsonable) + "\n")
            return
        window = f" · {found.window.label}" if found.window else ""
        console.print(
            f"[bold]{found.template.description}[/] [dim](template {found.template.id}, "
            f"cosine {found.score:.2f}; pipeline {query.parameters['pipeline']}{window})[/]",
            highlight=False,
        )
        for note in found.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        console.print(
            asking.shown(query), style="dim", highlight=False, markup=False, soft_wrap=True
        )
        _print_table(result)

    _run(action)


def _print_table(result: Any) -> None:
    """A query result as a table, with its row count."""
    table = Table(*result.columns)
    for row in result.rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)
    console.print(f"[dim]{len(result.rows)} row(s)[/]")


def _jsonable(value: object) -> object:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _specs(settings: Settings, names: list[str]) -> list[Any]:
    from streamml.schemas.catalog import load_pipelines

    try:
        return load_pipelines(settings.pipelines_dir, names)
    except StreamMLError as exc:
        _fail(exc)


@app.command()
def worker(
    pipeline: list[str] = typer.Option(
        [], "--pipeline", "-p", help="Pipeline(s) to run (default: every spec in the folder)."
    ),
    sink: bool = typer.Option(True, help="Also run the warehouse sink in this worker."),
) -> None:
    """Run a Faust worker for the pipelines in the foreground."""
    import asyncio

    from streamml.app import create_app, run_worker
    from streamml.devstack.broker import probe_metadata
    from streamml.streams.kafka import client_options, ensure_pipeline_topics

    settings = _settings()
    specs = _specs(settings, pipeline)
    options = client_options(settings)
    if not probe_metadata(settings.bootstrap_servers, settings.request_timeout_s, options):
        _fail(
            StreamMLError(
                f"no Kafka broker answers at {settings.bootstrap_servers}",
                hint="start the local one with `streamml up` or set STREAMML_KAFKA_BOOTSTRAP",
            )
        )

    def create_topics() -> None:
        asyncio.run(ensure_pipeline_topics(settings, specs))

    _run(create_topics)
    run_worker(create_app(settings, specs, with_sink=sink), settings.log_level)


@app.command()
def produce(
    pipeline: str = typer.Argument(..., help="Pipeline name (or spec path)."),
    file: str = typer.Argument(None, help="CSV or JSON-lines file of records."),
    synthetic: int = typer.Option(0, help="Send N synthetic records instead of a file."),
    dataset: bool = typer.Option(False, help="Send the pipeline's bundled dataset (phishing)."),
    rate: float = typer.Option(0.0, help="Records per second (0: as fast as possible)."),
    labels: bool = typer.Option(True, help="Also send the labels to <p>.labels."),
    label_delay: int = typer.Option(0, help="Send each label this many records later."),
    seed: int = typer.Option(7, help="Seed of the synthetic generator."),
    resume: bool = typer.Option(
        False, help="Continue FILE after what Kafka acknowledged in an earlier run."
    ),
    limit: int = typer.Option(0, help="Send at most N records in this run (0: no limit)."),
    give_up_s: float = typer.Option(
        300.0, help="Give up when Kafka acknowledged nothing for this long (broker down)."
    ),
) -> None:
    """Produce records (and labels) to a pipeline's topics with an idempotent producer.

    A broker restart is ridden out; what was delivered is reported, and a FILE's progress
    is kept so `--resume` sends only what Kafka did not acknowledge."""
    import asyncio
    import logging
    from pathlib import Path

    from rich.progress import Progress

    from streamml.models import synthetic as synth
    from streamml.streams.kafka import ensure_pipeline_topics
    from streamml.streams.ledger import FileProgress
    from streamml.streams.producer import (
        DeliveryOptions,
        ProduceIncompleteError,
        ProduceResult,
        count_records,
        produce_examples,
        read_file,
    )

    settings = _settings()
    [spec] = _specs(settings, [pipeline])
    store: FileProgress | None = None
    ledger = None
    if resume and not file:
        _fail(ConfigError("--resume continues a FILE", hint="give the FILE of the earlier run"))
    if dataset:
        examples: Any = synth.phishing()
        total: int | None = 1250
    elif synthetic:
        fields = set(spec.schema_.fields) - {spec.schema_.event_id, spec.schema_.timestamp}
        found = synth.generator_for(fields)
        if found is None:
            _fail(
                ConfigError(
                    f"no synthetic generator makes {spec.name}'s records",
                    hint="--synthetic fits the demo and tickets specs (and copies); give a FILE",
                )
            )
        examples, total = found[1](synthetic, seed=seed), synthetic
    elif file:
        path = Path(file)
        if not path.is_file():
            _fail(ConfigError(f"no such file: {file}"))
        examples, total = read_file(path, spec), count_records(path)
        store = FileProgress.of(settings, spec.name, path)
        ledger = _produce_resume_point(store, resume, file)
    else:
        _fail(StreamMLError("nothing to send", hint="give a FILE, --synthetic N or --dataset"))
    again = (
        f"streamml produce {pipeline} {file} --resume"
        + ("" if labels else " --no-labels")
        + (f" --label-delay {label_delay}" if label_delay else "")
    )
    last: list[ProduceResult] = []

    def checkpoint(result: ProduceResult) -> None:
        last[:] = [result]
        if store is not None:
            store.save(result.ledger, result.complete)

    def report(result: ProduceResult) -> None:
        summary = _produce_summary(result, spec.topic("raw"), total)
        console.print(summary, highlight=False, soft_wrap=True)
        if store is not None and not result.complete:
            console.print(f"resume with: {again}", highlight=False, soft_wrap=True)

    def action() -> None:
        asyncio.run(ensure_pipeline_topics(settings, [spec]))
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # a line per retry; ours say it
        options = DeliveryOptions(
            give_up_s=give_up_s, limit=limit or None, ledger=ledger, checkpoint=checkpoint
        )
        with Progress(console=console) as bar:
            task = bar.add_task(f"producing to {spec.topic('raw')}", total=total)
            try:
                result = asyncio.run(
                    produce_examples(
                        settings,
                        spec,
                        examples,
                        rate or None,
                        labels,
                        label_delay,
                        lambda n: bar.update(task, completed=n),
                        options,
                    )
                )
            except ProduceIncompleteError as exc:
                report(exc.result)
                raise
            except KeyboardInterrupt:
                if last:
                    report(last[0])
                raise typer.Exit(130) from None
        report(result)

    _run(action)


def _produce_resume_point(store: Any, resume: bool, file: str) -> Any:
    """The ledger ``--resume`` continues from; refuse when the file changed, and warn when a
    plain run would send again what an unfinished run delivered."""
    saved = store.load()
    if not resume:
        done = saved.ledger.next_index if saved is not None and saved.same_file else 0
        if saved is not None and not saved.complete and done:
            err_console.print(
                f"[yellow]warning:[/] an earlier run delivered the first {done} records of "
                f"{file} and stopped; this run sends all of it again (duplicates). "
                "Stop it (Ctrl-C) and add --resume to continue instead.",
                highlight=False,
            )
        return None
    if saved is None:
        _fail(
            ConfigError(
                f"no unfinished run of {file} for this pipeline to resume",
                hint="run without --resume to send the whole file",
            )
        )
    if not saved.same_file:
        _fail(
            ConfigError(
                f"{file} changed since the run to resume (size, time or content differ): "
                "resuming could skip or repeat records",
                hint="restore the original file, or run without --resume to send it all again",
            )
        )
    if saved.complete:
        console.print(f"{file} was delivered completely already; nothing to send")
        raise typer.Exit(0)
    return saved.ledger


def _produce_summary(result: Any, topic: str, total: int | None) -> str:
    unsent = ""
    if total is not None:
        left = total - result.skipped - result.delivered - result.failed
        unsent = f", {max(left, 0)} not sent"
    skipped = f" ({result.skipped} delivered earlier, skipped)" if result.skipped else ""
    return (
        f"delivered {result.delivered} records (+{result.labels_delivered} labels) to {topic} "
        f"in {result.elapsed_s:.1f} s{skipped}; failed {result.failed} records "
        f"(+{result.labels_failed} labels){unsent}"
    )


@app.command()
def tail(
    pipeline: str = typer.Argument(..., help="Pipeline name."),
    count: int = typer.Option(10, "-n", help="How many predictions to print."),
    timeout_s: float = typer.Option(30.0, help="Give up after this long."),
) -> None:
    """Print predictions from <p>.predictions (from the start of the topic)."""
    import asyncio

    from streamml.streams.kafka import consume

    settings = _settings()
    [spec] = _specs(settings, [pipeline])

    def action() -> None:
        messages = asyncio.run(
            consume(settings, [spec.topic("predictions")], count, None, timeout_s)
        )
        for message in messages:
            sys.stdout.write((message.value or b"").decode() + "\n")

    _run(action)


@app.command("schema")
def schema_export(
    pipeline: str = typer.Argument(..., help="Pipeline name."),
) -> None:
    """Print the JSON Schema of a pipeline's raw records (for producers in any language)."""
    from streamml.schemas.records import json_schema

    settings = _settings()
    [spec] = _specs(settings, [pipeline])
    sys.stdout.write(json.dumps(json_schema(spec), indent=2) + "\n")


def main() -> None:
    app()


def _register_commands() -> None:
    from streamml.cli_demo import demo
    from streamml.cli_models import models_app, retrain, train, trainer

    app.add_typer(models_app, name="models")
    for command in (train, retrain, trainer, demo):
        app.command()(command)


_register_commands()
