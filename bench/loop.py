"""Time from drift onset to the retrained model serving, on the demo pipeline.

    ~/.cache/streamml/venv/bin/python bench/loop.py [--events 24000] [--rate 300]

Starts its own broker and one worker (sink, trainer and alerts in it), streams the demo
payments (concept drift at the halfway mark, labels 200 events late) at ``--rate``; as in
the demo, a batch model trained on the first quarter is promoted before the drift. Then
it follows the audit trail. Prints, in seconds after the first post-drift event was sent:
drift detected, retrain requested, trained, shadow deployed, promoted (or archived).
Baseline in the same run: training the same spec on the same rows outside the loop
(``lifecycle.train_and_register`` on the worker's warehouse, not deployed); the ratio
says how much of the loop is the training itself.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

from streamml import lifecycle
from streamml.devstack import LocalBroker
from streamml.devstack.worker import WorkerProcess
from streamml.models.synthetic import payments
from streamml.schemas.catalog import load_pipelines
from streamml.streams.kafka import ensure_pipeline_topics
from streamml.streams.producer import produce_examples
from streamml.testing import isolated_settings

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("drift_detected", "retrain_requested", "trained", "challenger_set", "promoted", "archived")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=24_000)
    parser.add_argument("--rate", type=float, default=300.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
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
                onset: list[float] = []
                half = args.events // 2

                def progress(sent: int) -> None:
                    if sent >= half and not onset:
                        onset.append(time.time())

                examples = list(payments(args.events, seed=21, span_s=1200))
                warmup = args.events // 4

                def produce() -> None:
                    # as the demo: a batch champion trained on the pre-drift start, then
                    # the stream with the drift; the loop has to replace that champion
                    asyncio.run(
                        produce_examples(
                            settings, spec, examples[:warmup], rate=args.rate, label_delay=200
                        )
                    )
                    time.sleep(3)  # the sink writes the warm-up's last rows
                    first = lifecycle.train_and_register(
                        settings, spec, lifecycle.Window(), deploy=False, reason="bench champion"
                    )
                    lifecycle.promote(settings, spec, first.version.version, "bench champion")
                    asyncio.run(
                        produce_examples(
                            settings,
                            spec,
                            examples[warmup:],
                            rate=args.rate,
                            label_delay=200,
                            progress=lambda n: progress(warmup + n),
                        )
                    )

                thread = threading.Thread(target=produce, daemon=True)
                thread.start()
                seen: dict[str, float] = {}
                deadline = time.monotonic() + args.events / args.rate + 120
                while time.monotonic() < deadline and not ({"promoted", "archived"} & set(seen)):
                    if not onset:
                        time.sleep(0.5)
                        continue
                    _, rows = worker.query(
                        "SELECT action, toUnixTimestamp64Milli(min(ts)) FROM audit_events FINAL "
                        "WHERE pipeline = 'demo' AND ts >= "
                        f"fromUnixTimestamp64Milli({int(onset[0] * 1000)}) GROUP BY action"
                    )
                    seen = {str(a): int(t) / 1000 for a, t in rows if str(a) in STEPS}
                    time.sleep(0.5)
                thread.join(timeout=args.events / args.rate + 60)
                t0 = time.perf_counter()
                baseline = lifecycle.train_and_register(
                    settings,
                    spec,
                    lifecycle.Window(last_events=spec.retrain.last_events),
                    deploy=False,
                    reason="bench baseline",
                )
                train_s = time.perf_counter() - t0
            finally:
                worker.stop()
        finally:
            broker.down()
    start = onset[0] if onset else float("nan")
    print(f"events {args.events} rate {args.rate:.0f}/s drift onset at event {args.events // 2}")
    for step in STEPS:
        if step in seen:
            print(f"{step}_s_after_onset {seen[step] - start:.1f}")
    end = seen.get("promoted") or seen.get("archived")
    if end is not None:
        loop_s = end - start
        print(f"loop_s_onset_to_{'promoted' if 'promoted' in seen else 'archived'} {loop_s:.1f}")
        rows = baseline.version.training_window.get("rows")
        print(f"baseline_training_s {train_s:.1f} (rows {rows})")
        print(f"ratio_loop_over_training {loop_s / train_s:.1f}")
    else:
        print("the loop did not finish within the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
