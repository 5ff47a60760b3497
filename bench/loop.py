"""The closed loop on the demo's stream, over several seeds: does the served model recover?

    ~/.cache/streamml/venv/bin/python bench/loop.py [--seeds 1 2 3 4 5] [--events 24000]

Per seed, on a fresh stack of its own (broker, worker with sink, trainer and alerts, chDB,
registry): as ``streamml demo`` does, the first quarter of the payments stream is served by
the online model, then a batch model trained on it is promoted from the CLI's code path,
then the rest streams with the concept drift at the halfway mark (labels 200 events late).
Everything is then read back from ClickHouse: what was served, the labels, the audit trail.

One line per seed, ``key=value``:
``detection_delay_events`` (first concept-drift detection after the change, in events),
``detector_alarms_before_change`` (per-partition detector alarms dated before it),
``false_alarms_before_change`` (confirmed changes dated >100 events before it),
``retrain_started_before_change`` (1 if a retrain window started before it),
``recovery_events`` (from the change until the served accuracy over 500 labelled events is
back at >= 0.85), and the last quarter's served accuracy beside the majority baseline and
the best model not serving on the same events. Then ``worst_last_quarter_served_accuracy``.
The raw baseline of the run is the majority class on the same events (``*_baseline``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from streamml import lifecycle, sql
from streamml.devstack import LocalBroker
from streamml.devstack.worker import WorkerProcess
from streamml.models.synthetic import Example, payments
from streamml.recovery import analyse
from streamml.schemas.catalog import load_pipelines
from streamml.streams.kafka import ensure_pipeline_topics
from streamml.streams.producer import produce_examples
from streamml.testing import isolated_settings

ROOT = Path(__file__).resolve().parents[1]
SPAN_S = 1200.0  # event time of the whole stream, as in the demo
LABEL_DELAY = 200


def run_seed(
    seed: int, events: int, rate: float, keep: Path | None = None
) -> dict[str, float | int | str]:
    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(keep / f"seed-{seed}") if keep else scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        settings = isolated_settings(Path(tmp))
        broker = LocalBroker(settings)
        broker.up()
        try:
            settings = settings.model_copy(
                update={
                    "pipelines_dir": ROOT / "pipelines",
                    "kafka_bootstrap": settings.bootstrap_servers,
                }
            )
            [spec] = load_pipelines(ROOT / "pipelines", ["demo"])
            asyncio.run(ensure_pipeline_topics(settings, [spec]))
            worker = WorkerProcess(settings, ["demo"], Path(tmp) / "worker.log")
            worker.start()
            try:
                start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
                examples = list(payments(events, seed=seed, start=start, span_s=SPAN_S))
                warmup = events // 4
                good = sum(1 for ex in examples if ex.label is not None)

                def stream(part: list[Example]) -> None:
                    asyncio.run(
                        produce_examples(settings, spec, part, rate=rate, label_delay=LABEL_DELAY)
                    )

                stream(examples[:warmup])
                _wait(worker, f"pay-{seed}-", warmup, 120)
                first = lifecycle.train_and_register(
                    settings, spec, lifecycle.Window(), deploy=False, reason="bench champion"
                )
                lifecycle.promote(settings, spec, first.version.version, "bench champion")
                thread = threading.Thread(target=stream, args=(examples[warmup:],), daemon=True)
                thread.start()
                thread.join()
                _wait(worker, f"pay-{seed}-", good, 180)
                time.sleep(10)  # a judgement in flight finishes; its rows land
                _, rows = worker.query(sql.served_rows("demo", f"pay-{seed}-").render())
                _, audit = worker.query(sql.audit_details("demo").render())
            finally:
                worker.stop()
        finally:
            broker.down()
    change = events // 2
    step_ms = SPAN_S * 1000 / events
    start_ms = int(start.timestamp() * 1000)

    def index(ts_ms: float) -> float:
        return (ts_ms - start_ms) / step_ms

    typed = [(int(i), str(v), int(s), str(c), str(lab)) for i, v, s, c, lab in rows]
    result = analyse(typed, events, change)
    detections = []
    confirmed = []
    retrain_before = 0
    promotions = 0
    for action, details_text, _ in audit:
        details = json.loads(details_text or "{}")
        if action == "drift_detected" and details.get("kind") == "concept":
            detections.append(index(float(details.get("event_ts_ms") or 0)))
        elif action == "drift_confirmed" and details.get("change_ts_ms"):
            confirmed.append(index(float(details["change_ts_ms"])))
        elif action == "retrain_requested":
            since = details.get("since_ms")
            if since is None or index(float(since)) < change:
                retrain_before = 1
        elif action == "promoted":
            promotions += 1
    after = [d for d in detections if d >= change]
    last = result.phase("last quarter")
    return {
        "seed": seed,
        "detection_delay_events": round(after[0] - change) if after else -1,
        "detector_alarms_before_change": sum(1 for d in detections if d < change),
        "false_alarms_before_change": sum(1 for c in confirmed if c < change - 100),
        "change_estimate_error_events": round(
            min((c for c in confirmed if c >= change - 100), default=float("nan")) - change
        )
        if any(c >= change - 100 for c in confirmed)
        else "none",
        "retrain_started_before_change": retrain_before,
        "recovery_events": result.recovery_events if result.recovery_events is not None else -1,
        "promotions": promotions,
        "last_quarter_served_accuracy": round(last.served, 4),
        "last_quarter_baseline_accuracy": round(last.baseline, 4),
        "last_quarter_best_shadow": last.best_shadow or "none",
        "last_quarter_best_shadow_accuracy": round(last.best_shadow_accuracy, 4),
        "right_after_served_accuracy": round(result.phase("right after it").served, 4),
    }


def _wait(worker: WorkerProcess, prefix: str, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    text = sql.served_events("demo", prefix).render()  # /query takes text only
    while time.monotonic() < deadline:
        if int(worker.query(text)[1][0][0]) >= n:
            return
        time.sleep(1)
    raise RuntimeError(f"only {worker.query(text)[1][0][0]} of {n} events were served in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--events", type=int, default=24_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--keep", type=Path, help="keep each seed's stack and logs here")
    args = parser.parse_args()
    lines = []
    for seed in args.seeds:
        t0 = time.monotonic()
        line = run_seed(seed, args.events, args.rate, args.keep)
        line["seconds"] = round(time.monotonic() - t0)
        lines.append(line)
        print(" ".join(f"{k}={v}" for k, v in line.items()), flush=True)
    accuracy = [float(x["last_quarter_served_accuracy"]) for x in lines]
    recovery = [int(x["recovery_events"]) for x in lines]
    print(f"median_last_quarter_served_accuracy={statistics.median(accuracy):.4f}")
    print(f"median_recovery_events={statistics.median(recovery)}")
    print(f"worst_recovery_events={max(recovery) if -1 not in recovery else -1}")
    print(f"worst_last_quarter_served_accuracy={min(accuracy):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
