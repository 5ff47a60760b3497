"""The main job: the demo pipeline end to end on the embedded default stack.

Starts the broker (unless running) and a worker, streams synthetic payments with a
concept drift halfway, a few malformed records and delayed labels, shows live
progress, then prints ClickHouse analytics, saves a PNG of accuracy over time, and
stops what it started.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamml.config import Settings
from streamml.devstack import LocalBroker
from streamml.devstack.worker import WorkerProcess
from streamml.errors import DevStackError
from streamml.models.synthetic import payments
from streamml.schemas.catalog import load_pipelines
from streamml.streams.kafka import ensure_pipeline_topics
from streamml.streams.producer import produce_examples

PIPELINE = "demo"
BAD_EVERY = 250


@dataclass
class Tick:
    """One progress sample of the running demo."""

    elapsed_s: float
    produced: int
    scored: int
    learned: int
    dead_letters: int
    in_warehouse: int
    events_per_s: float
    rolling_accuracy: float | None


@dataclass
class DemoReport:
    events: int
    good: int
    bad: int
    seconds: float = 0.0
    per_minute: list[list[Any]] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)
    dead_letters: list[list[Any]] = field(default_factory=list)
    predictions: int = 0
    dead_letter_rows: int = 0
    png: Path | None = None
    run_filter: str = "1"
    stopped: list[str] = field(default_factory=list)
    left_running: list[str] = field(default_factory=list)


def run_demo(
    settings: Settings,
    events: int,
    say: Callable[[str], None],
    on_tick: Callable[[Tick], None],
    keep_broker: bool = False,
    timeout_s: float = 240.0,
) -> DemoReport:
    [spec] = load_pipelines(settings.pipelines_dir, [PIPELINE])
    bad = events // BAD_EVERY
    report = DemoReport(events, events - bad, bad)
    broker = LocalBroker(settings, progress=say)
    was_running = broker.status().state in ("running", "external")
    broker.up()
    worker = WorkerProcess(settings, [PIPELINE], settings.state_dir / "demo" / "worker.log")
    started = time.monotonic()
    try:
        asyncio.run(ensure_pipeline_topics(settings, [spec]))
        say(f"starting a worker for pipeline {PIPELINE!r} (log: {worker.log_file}) ...")
        worker.start()
        run_start = dt.datetime.now(dt.UTC).replace(microsecond=0)
        seed = int(run_start.timestamp())
        report.run_filter = f"startsWith(event_id, 'pay-{seed}-')"  # this run's events only
        examples = payments(events, seed=seed, start=run_start, span_s=1200, bad_every=BAD_EVERY)
        produced = [0]
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                asyncio.run(
                    produce_examples(
                        settings,
                        spec,
                        examples,
                        rate=None,
                        label_delay=200,
                        progress=lambda n: produced.__setitem__(0, n),
                    )
                )
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)

        say(f"streaming {events} events ({bad} malformed on purpose), drift at the halfway mark")
        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        _watch(worker, report, run_start, produced, started, on_tick, timeout_s, thread, failure)
        report.seconds = time.monotonic() - started
        _analytics(worker, report, run_start)
        report.png = _plot(report, settings.state_dir / "demo" / "accuracy.png", run_start)
    finally:
        report.stopped.append(worker.stop())
        if not was_running and not keep_broker:
            report.stopped.append(broker.down())
        elif broker.status().state == "running":
            report.left_running.append(f"Kafka broker at {broker.bootstrap}")
    return report


def _since(run_start: dt.datetime) -> str:
    return f"toDateTime64('{run_start:%Y-%m-%d %H:%M:%S}', 3, 'UTC')"


def _watch(
    worker: WorkerProcess,
    report: DemoReport,
    run_start: dt.datetime,
    produced: list[int],
    started: float,
    on_tick: Callable[[Tick], None],
    timeout_s: float,
    thread: threading.Thread,
    failure: list[BaseException],
) -> None:
    since = _since(run_start)
    last = (time.monotonic(), 0, 0.0, 0.0)  # time, scored, correct, learned
    deadline = time.monotonic() + timeout_s
    while True:
        if failure:
            raise failure[0]
        stats = worker.get("/stats")["pipelines"][PIPELINE]
        counters = stats["counters"]
        learned = sum(p["learned"] for p in stats["prequential"].values())
        correct = sum(p["learned"] * p["accuracy"] for p in stats["prequential"].values())
        _, rows = worker.query(
            f"SELECT (SELECT uniqExact(event_id) FROM predictions WHERE pipeline = '{PIPELINE}' "
            f"AND {report.run_filter}), (SELECT count() FROM dead_letters FINAL WHERE pipeline = "
            f"'{PIPELINE}' AND ts >= {since})"
        )
        in_warehouse, dead = int(rows[0][0]), int(rows[0][1])
        now = time.monotonic()
        scored = int(counters.get("scored", 0))
        d_learned = learned - last[3]
        tick = Tick(
            elapsed_s=now - started,
            produced=produced[0],
            scored=scored,
            learned=int(learned),
            dead_letters=dead,
            in_warehouse=in_warehouse,
            events_per_s=(scored - last[1]) / max(now - last[0], 1e-3),
            rolling_accuracy=(correct - last[2]) / d_learned if d_learned > 0 else None,
        )
        on_tick(tick)
        last = (now, scored, correct, learned)
        if not thread.is_alive() and in_warehouse >= report.good and dead >= report.bad:
            return
        if now > deadline:
            raise DevStackError(
                f"the demo did not finish within {timeout_s:.0f} s: {in_warehouse} of {report.good}"
                f" predictions and {dead} of {report.bad} dead letters reached ClickHouse"
            )
        time.sleep(1.0)


def _analytics(worker: WorkerProcess, report: DemoReport, run_start: dt.datetime) -> None:
    since = _since(run_start)
    _, report.per_minute = worker.query(f"""
        SELECT toStartOfMinute(p.ts) AS minute, count() AS n,
               round(avg(p.predicted_class = l.label), 3) AS accuracy
        FROM (SELECT event_id, ts, predicted_class FROM predictions FINAL
              WHERE pipeline = '{PIPELINE}' AND {report.run_filter}) AS p
        INNER JOIN (SELECT event_id, label FROM labels FINAL WHERE pipeline = '{PIPELINE}') AS l
        USING event_id
        GROUP BY minute ORDER BY minute""")
    _, rows = worker.query(f"""
        SELECT quantile(0.5)(latency_ms), quantile(0.99)(latency_ms),
               quantile(0.5)(e2e_latency_ms), quantile(0.99)(e2e_latency_ms), count()
        FROM predictions FINAL WHERE pipeline = '{PIPELINE}' AND {report.run_filter}""")
    names = [
        "score_p50_ms",
        "score_p99_ms",
        "event_to_prediction_p50_ms",
        "event_to_prediction_p99_ms",
        "predictions",
    ]
    report.latency = {n: float(v) for n, v in zip(names, rows[0], strict=True)}
    report.predictions = int(report.latency.pop("predictions"))
    _, report.dead_letters = worker.query(f"""
        SELECT error_class, count() AS n, any(reason) AS example FROM dead_letters FINAL
        WHERE pipeline = '{PIPELINE}' AND ts >= {since} GROUP BY error_class ORDER BY n DESC""")
    report.dead_letter_rows = sum(int(r[1]) for r in report.dead_letters)


def _plot(report: DemoReport, path: Path, run_start: dt.datetime) -> Path | None:
    if not report.per_minute:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [dt.datetime.fromisoformat(str(r[0])) for r in report.per_minute]
    # plot each minute at its centre, in minutes since the first event
    offsets = [(m.replace(tzinfo=dt.UTC) - run_start).total_seconds() / 60 + 0.5 for m in minutes]
    accuracy = [float(r[2]) for r in report.per_minute]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(offsets, accuracy, marker="o", label="served accuracy per minute (ClickHouse)")
    ax.axvline(10, color="red", linestyle="--", label="concept drift injected")
    ax.set_xlabel("event time, minutes since start")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"streamml demo: {report.events} events, online logistic regression")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
