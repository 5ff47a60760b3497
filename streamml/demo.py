"""The main job: the demo pipeline end to end on the embedded default stack.

Starts the broker (unless running) and a worker, streams synthetic payments with a
concept drift halfway, a few malformed records and delayed labels, shows live
progress, then prints ClickHouse analytics, saves a PNG of accuracy over time, and
stops what it started.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamml import sql
from streamml.config import Settings
from streamml.devstack import LocalBroker
from streamml.devstack.worker import WorkerProcess, settings_env
from streamml.errors import DevStackError
from streamml.models.registry import Registry
from streamml.models.synthetic import payments
from streamml.recovery import Recovery, analyse
from streamml.schemas.catalog import load_pipelines
from streamml.streams.kafka import ensure_pipeline_topics
from streamml.streams.producer import produce_examples

PIPELINE = "demo"
BAD_EVERY = 250
RATE = 200.0  # events/s: slow enough that the loop closes while the stream still runs


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
    champion: str = ""
    drifts: int = 0
    trainer: str = ""


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
    run_prefix: str = ""  # the ids of this run's events start so
    stopped: list[str] = field(default_factory=list)
    left_running: list[str] = field(default_factory=list)
    audit: list[list[Any]] = field(default_factory=list)
    drift_events: list[list[Any]] = field(default_factory=list)
    roles: list[list[Any]] = field(default_factory=list)
    cli: list[tuple[str, str]] = field(default_factory=list)  # (command, output)
    marks: dict[str, float] = field(default_factory=dict)  # label -> event-time minute
    state_dir: Path | None = None  # the demo's own stack: broker data, chDB, registry
    recovery: Recovery | None = None  # served accuracy around the drift, from ClickHouse
    seed: int = 0


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
    home = settings.state_dir / "demo"
    settings = _fresh_stack(settings, home, say)
    report.state_dir = settings.state_dir
    broker = LocalBroker(settings, progress=say)
    was_running = broker.status().state in ("running", "external")
    broker.up()
    worker = WorkerProcess(settings, [PIPELINE], home / "worker.log")
    started = time.monotonic()
    try:
        asyncio.run(ensure_pipeline_topics(settings, [spec]))
        say(f"starting a worker for pipeline {PIPELINE!r} (log: {worker.log_file}) ...")
        worker.start()
        run_start = dt.datetime.now(dt.UTC).replace(microsecond=0)
        seed = report.seed = int(run_start.timestamp())
        report.run_prefix = f"pay-{seed}-"  # this run's events only
        examples = list(
            payments(events, seed=seed, start=run_start, span_s=1200, bad_every=BAD_EVERY)
        )
        warmup = events // 4
        produced = [0]
        failure: list[BaseException] = []

        def stream(part: list[Any], offset: int) -> threading.Thread:
            def produce() -> None:
                try:
                    asyncio.run(
                        produce_examples(
                            settings,
                            spec,
                            part,
                            rate=RATE,
                            label_delay=200,
                            progress=lambda n: produced.__setitem__(0, offset + n),
                        )
                    )
                except BaseException as exc:  # reported by the main thread
                    failure.append(exc)

            thread = threading.Thread(target=produce, daemon=True)
            thread.start()
            return thread

        def good_in(part: list[Any]) -> int:
            return sum(1 for ex in part if ex.label is not None)

        say(
            f"streaming {events} events at {RATE:.0f}/s ({bad} malformed on purpose); the "
            f"first {warmup} before any drift, with the online model serving"
        )
        thread = stream(examples[:warmup], 0)
        watch = (worker, report, run_start, produced, started, on_tick, timeout_s)
        _watch(*watch, thread, failure, good_in(examples[:warmup]))
        _first_batch_model(settings, report, say)
        say(
            f"streaming the other {events - warmup}: concept drift at event {events // 2}; "
            "the worker's trainer watches the champion's errors"
        )
        thread = stream(examples[warmup:], warmup)
        _watch(*watch, thread, failure, report.good)
        _settle(worker, say)
        _lifecycle_from_cli(settings, worker, report, say)
        report.seconds = time.monotonic() - started
        _analytics(worker, report, run_start)
        report.png = _plot(report, home / "accuracy.png", run_start)
    finally:
        stop_stack(report, worker, broker, was_running, keep_broker)
    return report


def stop_stack(
    report: Any, worker: WorkerProcess, broker: LocalBroker, was_running: bool, keep_broker: bool
) -> None:
    """Stop the demo's worker, and its broker unless it was running before (or is kept);
    say what was stopped and what is left running in ``report``."""
    report.stopped.append(worker.stop())
    if not was_running and not keep_broker:
        report.stopped.append(broker.down())
    elif broker.status().state == "running":
        report.left_running.append(f"Kafka broker at {broker.bootstrap}")


def _fresh_stack(settings: Settings, home: Path, say: Callable[[str], None]) -> Settings:
    """The demo runs on a stack of its own, new each run (``<state_dir>/demo/stack``): a
    model, a registry or consumer offsets left by an earlier run would change the story."""
    update: dict[str, Any] = {"state_dir": home / "stack"}
    if settings.uses_local_broker and LocalBroker(settings).status().state == "running":
        update["kafka_bootstrap"] = settings.bootstrap_servers  # use the broker already up
    stack = settings.model_copy(update=update)
    if stack.state_dir.exists():
        previous = LocalBroker(stack)
        if previous.status().state == "running":
            say(previous.down())
        shutil.rmtree(stack.state_dir)
    stack.state_dir.mkdir(parents=True)
    return stack


def _settle(worker: WorkerProcess, say: Callable[[str], None], timeout_s: float = 45.0) -> None:
    """Give a retrain or challenger judgement in progress a moment to finish."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(worker.get("/stats").get("trainer", {}).get(PIPELINE, "idle"))
        if (
            not status.startswith(("waiting", "training", "v"))
            or "promote" in status
            or ("archive" in status)
        ):
            return
        say(f"trainer: {status}")
        time.sleep(3)


def _cli(settings: Settings, *args: str) -> str:
    """Run a ``streamml`` command in this process (the demo's settings, output recorded):
    the same code as the command line, without paying the imports again per command."""
    import io
    import os

    import typer
    from rich.console import Console

    from streamml import cli

    saved_env = dict(os.environ)
    os.environ.update(settings_env(settings))
    recorder = Console(file=io.StringIO(), width=110, record=True)
    saved_console, cli.console = cli.console, recorder
    try:
        cli.app(list(args), standalone_mode=False)
    except (typer.Exit, SystemExit) as exc:  # a command's error was printed; say how it ended
        code = getattr(exc, "exit_code", getattr(exc, "code", 1))
        recorder.print(f"(exit code {code})")
    finally:
        cli.console = saved_console
        os.environ.clear()
        os.environ.update(saved_env)
    return recorder.export_text().strip()


def _run_cli(settings: Settings, report: DemoReport, say: Callable[[str], None], *args: str) -> str:
    say("$ streamml " + " ".join(args))
    out = _cli(settings, *args)
    report.cli.append(("streamml " + " ".join(args), out))
    return out


def _first_batch_model(settings: Settings, report: DemoReport, say: Callable[[str], None]) -> None:
    """Before the drift, from the CLI: train a batch model on what the pipeline logged,
    run it as a shadow, then promote it -- the champion the drift will then hurt."""
    _run_cli(settings, report, say, "train", PIPELINE, "--no-deploy")
    version = Registry(settings.registry_path).list(PIPELINE)[-1].version
    _run_cli(settings, report, say, "models", "challenger", PIPELINE, version)
    _run_cli(
        settings,
        report,
        say,
        "models",
        "promote",
        PIPELINE,
        version,
        "--reason",
        "demo: serve the batch model",
    )


def _lifecycle_from_cli(
    settings: Settings, worker: WorkerProcess, report: DemoReport, say: Callable[[str], None]
) -> None:
    """After the stream: the registry as the loop left it, then a rollback and back."""
    _run_cli(settings, report, say, "models", "list", PIPELINE)
    registry = Registry(settings.registry_path)
    champion = registry.champion(PIPELINE)
    if champion is not None:
        _run_cli(
            settings, report, say, "models", "rollback", PIPELINE, "--reason", "demo: roll back"
        )
        _run_cli(
            settings,
            report,
            say,
            "models",
            "promote",
            PIPELINE,
            champion.version,
            "--reason",
            "demo: and forward again",
        )
    time.sleep(1.0)
    report.cli.append(
        ("serving now", str(worker.get("/stats")["pipelines"][PIPELINE]["deployment"]))
    )


def _since(run_start: dt.datetime) -> int:
    return int(run_start.timestamp() * 1000)


def _ask(worker: WorkerProcess, query: sql.Query) -> list[list[Any]]:
    """The rows of ``query`` through the worker's /query endpoint, which takes text only:
    the values go in as escaped literals."""
    return worker.query(query.render())[1]


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
    good: int,
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
        rows = _ask(worker, sql.demo_progress(PIPELINE, report.run_prefix, since))
        in_warehouse, dead = int(rows[0][0]), int(rows[0][1])
        trainer = worker.get("/stats").get("trainer", {}).get(PIPELINE, "")
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
            champion=str(stats["deployment"]["champion"]["version"]),
            drifts=sum(int(v) for k, v in counters.items() if k.startswith("drift.")),
            trainer=str(trainer),
        )
        on_tick(tick)
        last = (now, scored, correct, learned)
        settled = good < report.good or dead >= report.bad  # dead letters: the last part
        if not thread.is_alive() and in_warehouse >= good and settled:
            return
        if now > deadline:
            raise DevStackError(
                f"the demo did not finish within {timeout_s:.0f} s: {in_warehouse} of {report.good}"
                f" predictions and {dead} of {report.bad} dead letters reached ClickHouse"
            )
        time.sleep(1.0)


def _analytics(worker: WorkerProcess, report: DemoReport, run_start: dt.datetime) -> None:
    since = _since(run_start)
    prefix = report.run_prefix
    report.per_minute = _ask(worker, sql.accuracy_per_minute(PIPELINE, prefix))
    rows = _ask(worker, sql.latency_quantiles(PIPELINE, prefix))
    names = [
        "score_p50_ms",
        "score_p99_ms",
        "event_to_prediction_p50_ms",
        "event_to_prediction_p99_ms",
        "predictions",
    ]
    report.latency = {n: float(v) for n, v in zip(names, rows[0], strict=True)}
    report.predictions = int(report.latency.pop("predictions"))
    report.dead_letters = _ask(worker, sql.dead_letter_causes(PIPELINE, since))
    report.dead_letter_rows = sum(int(r[1]) for r in report.dead_letters)
    report.audit = _ask(worker, sql.audit_trail(PIPELINE, since))
    report.drift_events = _ask(worker, sql.drift_summary(PIPELINE, since))
    report.roles = _ask(worker, sql.role_accuracy(PIPELINE, since))
    rows = _ask(worker, sql.served_rows(PIPELINE, prefix))
    typed = [(int(i), str(v), int(sv), str(c), str(lab)) for i, v, sv, c, lab in rows]
    report.recovery = analyse(typed, report.events, report.events // 2)
    span = 1200 / 60  # the demo's event time runs 20 minutes; the drift is at the middle
    report.marks["concept drift injected"] = span / 2
    confirmed = _ask(
        worker,
        sql.first_detail_ms(
            "audit_events", "change_ts_ms", PIPELINE, since, action="drift_confirmed"
        ),
    )
    start_ms = run_start.timestamp() * 1000
    if confirmed and confirmed[0][0] and int(confirmed[0][0]) > start_ms:
        report.marks["change confirmed (dated)"] = (int(confirmed[0][0]) - start_ms) / 60_000
    first_drift = _ask(
        worker, sql.first_detail_ms("drift_events", "event_ts_ms", PIPELINE, since, kind="concept")
    )
    if first_drift and first_drift[0][0] and int(first_drift[0][0]) > start_ms:
        report.marks["drift detected"] = (int(first_drift[0][0]) - start_ms) / 60_000
    for label, reason, version in (
        ("batch model promoted (CLI)", "demo:", ""),
        ("loop promotes the online model", "judged", "online"),
        ("loop promotes a retrained model", "judged", "v"),
    ):
        promoted = _ask(worker, sql.first_promotion_ms(PIPELINE, since, reason, version))
        if not promoted:
            continue
        # where it took effect: the event time of the first answer served after it
        first = _ask(worker, sql.first_served_after_ms(PIPELINE, prefix, int(promoted[0][0])))
        if first and first[0][0] and int(first[0][0]) > start_ms:
            report.marks[label] = (int(first[0][0]) - start_ms) / 60_000


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
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(offsets, accuracy, marker="o", alpha=0.5, label="served accuracy per minute")
    per_event = 1200 / 60 / report.events  # minutes of event time per event
    if report.recovery is not None:
        for series, style, label in (
            (report.recovery.rolling, "-k", "served accuracy, last 500 labelled events"),
            (report.recovery.baseline_rolling, "--", "majority-class baseline, same events"),
        ):
            points = [(i * per_event, a) for i, a in series]
            ax.plot([x for x, _ in points], [y for _, y in points], style, label=label)
    styles = {
        "concept drift injected": ("red", "--"),
        "drift detected": ("orange", ":"),
        "change confirmed (dated)": ("darkorange", "-"),
        "batch model promoted (CLI)": ("purple", "-."),
        "loop promotes the online model": ("teal", "-."),
        "loop promotes a retrained model": ("green", "-."),
    }
    for label, minute in report.marks.items():
        color, style = styles.get(label, ("grey", ":"))
        ax.axvline(minute, color=color, linestyle=style, label=label)
    ax.set_xlabel("event time, minutes since start")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.4, 1)
    ax.set_title(f"streamml demo: {report.events} events, drift -> confirm -> judge -> promote")
    return save_chart(fig, ax, path)


def save_chart(fig: Any, ax: Any, path: Path) -> Path:
    """A demo's chart: legend and grid, written as a PNG at ``path``, the figure closed."""
    import matplotlib.pyplot as plt

    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
