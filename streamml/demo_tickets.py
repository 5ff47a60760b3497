"""``streamml demo tickets``: the text pipeline end to end on a fresh stack of its own.

Streams synthetic support tickets (a third without a label, labels late, a few malformed
records, a new product halfway) through a worker for the ``tickets`` pipeline with live
progress, then has :mod:`streamml.demo_tickets_report` read from ClickHouse what the
language models did, asks one ``streamml ask`` question, saves a PNG and stops what it
started.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from streamml import sql
from streamml.config import Settings
from streamml.demo import _ask, _cli, _fresh_stack, stop_stack
from streamml.demo_tickets_report import (
    PIPELINE,
    TicketsReport,
    analyse,
    is_new,
    plot,
    since,
)
from streamml.devstack import LocalBroker
from streamml.devstack.worker import WorkerProcess
from streamml.errors import DevStackError
from streamml.models.synthetic import Example
from streamml.models.text import labeller_source
from streamml.models.tickets import NEW_PRODUCT, tickets
from streamml.schemas.catalog import load_pipelines
from streamml.schemas.spec import PipelineSpec
from streamml.streams.kafka import ensure_pipeline_topics
from streamml.streams.producer import produce_examples

BAD_EVERY = 200
RATE = 200.0  # events/s: the int8 encoder on one CPU thread keeps up with it on 2 cores
LABEL_DELAY = 100
QUESTION = "How accurate are the weak labels from each source?"


@dataclass
class TicketsTick:
    """One progress sample of the running tickets demo."""

    elapsed_s: float
    produced: int
    scored: int
    learned: int
    events_per_s: float
    rolling_accuracy: float | None  # served, on the latest 250 labelled events in ClickHouse
    in_warehouse: int
    dead_letters: int
    weak_labels: int = 0
    flags: int = 0
    summaries: int = 0
    new_clusters: int = 0
    drifts: dict[str, int] = field(default_factory=dict)  # kind -> detections


def run_tickets_demo(
    settings: Settings,
    events: int,
    say: Callable[[str], None],
    on_tick: Callable[[TicketsTick], None],
    keep_broker: bool = False,
    rate: float = RATE,
    timeout_s: float = 240.0,
) -> TicketsReport:
    """Run the demo on ``<state_dir>/demo-tickets/stack``; ``timeout_s``: how long past
    the stream's own length ClickHouse may take to hold everything."""
    [spec] = load_pipelines(settings.pipelines_dir, [PIPELINE])
    home = settings.state_dir / "demo-tickets"
    settings = _fresh_stack(settings, home, say)
    broker = LocalBroker(settings, progress=say)
    was_running = broker.status().state in ("running", "external")
    broker.up()
    worker = WorkerProcess(settings, [PIPELINE], home / "worker.log")
    started = time.monotonic()
    report = TicketsReport(events, 0, 0, 0, rate, state_dir=settings.state_dir)
    try:
        asyncio.run(ensure_pipeline_topics(settings, [spec]))
        say(
            f"starting a worker for pipeline {PIPELINE!r} (log: {worker.log_file}); the first "
            "run exports the MiniLM text encoder to int8 once ..."
        )
        worker.start(timeout_s=600)
        run_start = dt.datetime.now(dt.UTC).replace(microsecond=0)
        seed = int(run_start.timestamp())
        report.run_prefix = f"tkt-{seed}-"
        examples = list(
            tickets(events, seed, 0.5, 0.3, run_start, span_s=events / rate, bad_every=BAD_EVERY)
        )
        good = [e for e in examples if isinstance(e.record, dict)]
        report.good, report.bad = len(good), events - len(good)
        report.labelled = sum(e.label is not None for e in good)
        report.new_product_at = next((i for i, e in enumerate(examples) if is_new(e)), events)
        say(
            f"streaming {events} support tickets at {rate:.0f}/s: "
            f"{report.good - report.labelled} without a label, labels {LABEL_DELAY} events "
            f"late, {report.bad} malformed on purpose; the {NEW_PRODUCT} (a product never "
            f"seen before) from ticket {report.new_product_at}"
        )
        _stream_and_watch(settings, spec, worker, report, examples, run_start, on_tick, timeout_s)
        _wait_labeller_metrics(worker, report, run_start)
        partitions = spec.topics.partitions or settings.topic_partitions
        analyse(spec, worker, report, examples, run_start, partitions)
        say(f'$ streamml ask "{QUESTION}" -p {PIPELINE}')
        out = _cli(settings, "ask", QUESTION, "-p", PIPELINE)
        report.ask = (f'streamml ask "{QUESTION}" -p {PIPELINE}', out)
        found = re.search(r"(\d+) row\(s\)", out)
        report.ask_rows = int(found.group(1)) if found else 0
        report.png = plot(report, home / "tickets.png")
        report.seconds = time.monotonic() - started
    finally:
        stop_stack(report, worker, broker, was_running, keep_broker)
    return report


def _stream_and_watch(
    settings: Settings,
    spec: PipelineSpec,
    worker: WorkerProcess,
    report: TicketsReport,
    examples: list[Example],
    run_start: dt.datetime,
    on_tick: Callable[[TicketsTick], None],
    timeout_s: float,
) -> None:
    """Produce in a thread; sample the worker each second until ClickHouse holds every
    answer, weak label, label and dead letter of the run."""
    produced, failure = [0], list[BaseException]()

    def produce() -> None:
        try:
            asyncio.run(
                produce_examples(
                    settings,
                    spec,
                    examples,
                    rate=report.rate,
                    label_delay=LABEL_DELAY,
                    progress=lambda n: produced.__setitem__(0, n),
                )
            )
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    started = time.monotonic()
    deadline = started + timeout_s + report.events / report.rate
    prefix = report.run_prefix
    source = labeller_source(spec) or ""
    query = sql.tickets_progress(PIPELINE, prefix, source, since(run_start))
    rolling = sql.tickets_rolling_accuracy(PIPELINE, prefix, last=250)
    last = (started, 0)  # time, scored
    while True:
        if failure:
            raise failure[0]
        # ClickHouse first, then the worker: once every event is served, what the worker
        # says it sent is final, and the warehouse must hold all of it
        served, dead, weak, labels = (int(v) for v in _ask(worker, query)[0])
        accuracy = float(_ask(worker, rolling)[0][0])
        stats = worker.get("/stats")["pipelines"][PIPELINE]
        counters: dict[str, int] = stats["counters"]
        learned = sum(int(p["learned"]) for p in stats["prequential"].values())
        now, scored = time.monotonic(), int(counters.get("scored", 0))
        tick = TicketsTick(
            elapsed_s=now - started,
            produced=produced[0],
            scored=scored,
            learned=learned,
            events_per_s=(scored - last[1]) / max(now - last[0], 1e-3),
            rolling_accuracy=accuracy if accuracy >= 0 else None,
            in_warehouse=served,
            dead_letters=dead,
            weak_labels=int(counters.get("annotations.weak_labels", 0)),
            flags=int(counters.get("annotations.flags", 0)),
            summaries=int(counters.get("annotations.summarys", 0)),
            new_clusters=int(counters.get("text.new_clusters", 0)),
            drifts=_drifts(counters),
        )
        on_tick(tick)
        last = (now, scored)
        # weak labels: those the worker sent (the spec keeps the confident ones only)
        arrived = served >= report.good and weak >= tick.weak_labels and dead >= report.bad
        if not thread.is_alive() and arrived and labels >= report.labelled:
            return
        if now > deadline:
            raise DevStackError(
                f"the tickets demo did not finish in time: {served} of {report.good} answers, "
                f"{weak} weak labels, {labels} of {report.labelled} labels and {dead} of "
                f"{report.bad} dead letters reached ClickHouse; worker log: {worker.log_file}"
            )
        time.sleep(1.0)


def _drifts(counters: dict[str, int]) -> dict[str, int]:
    """Drift detections by kind; a new cluster is data drift, counted apart here."""
    found = {
        k.removeprefix("drift."): int(v) for k, v in counters.items() if k.startswith("drift.")
    }
    if "data" in found:
        found["data"] -= int(counters.get("text.new_clusters", 0))
    return {k: v for k, v in found.items() if v}


def _wait_labeller_metrics(
    worker: WorkerProcess, report: TicketsReport, run_start: dt.datetime, timeout_s: float = 30
) -> None:
    """The labeller's metrics rows of the last minute go out every few seconds: wait
    until they count every label (or give up quietly: the report shows what came)."""
    query = sql.tickets_labeller_labelled(PIPELINE, since(run_start))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = _ask(worker, query)
        if rows and rows[0][0] is not None and int(rows[0][0]) >= report.labelled:
            return
        time.sleep(1.0)
