"""End-to-end pipeline throughput and latency against a plain aiokafka pass-through.

    ~/.cache/streamml/venv/bin/python bench/pipeline.py [--events 3000] [--rate 100]

Starts its own broker (temporary state dir, free ports). Baseline: one aiokafka
consumer -> producer pass-through over a topic of the same partition count, batched
(getmany + unawaited sends). Pipeline: one streamml worker running the demo spec with its
warehouse sink; an event counts once its prediction row is in ClickHouse.
Prints one line per figure and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamml.devstack import LocalBroker
from streamml.devstack.worker import WorkerProcess
from streamml.models.synthetic import payments
from streamml.schemas.catalog import load_pipelines
from streamml.streams.kafka import ensure_pipeline_topics, ensure_topics
from streamml.streams.producer import produce_examples
from streamml.streams.topics import dumps
from streamml.testing import isolated_settings

ROOT = Path(__file__).resolve().parents[1]


async def passthrough(settings, n: int, rate: float | None) -> tuple[float, list[float]]:
    """Records/s through consume -> produce, and per-record latency (ms) at ``rate``."""
    tag = f"pt{int(time.time() * 1000)}"
    src, dst = f"bench.{tag}.in", f"bench.{tag}.out"
    await ensure_topics(settings, [src, dst], partitions=6)
    boot = settings.bootstrap_servers
    producer = AIOKafkaProducer(bootstrap_servers=boot, linger_ms=5)
    relay_out = AIOKafkaProducer(bootstrap_servers=boot, linger_ms=2)
    consumer = AIOKafkaConsumer(
        src,
        bootstrap_servers=boot,
        group_id=tag,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    await asyncio.gather(producer.start(), relay_out.start(), consumer.start())
    latencies: list[float] = []
    done = asyncio.Event()
    first: list[float] = []

    async def relay() -> None:
        seen = 0
        while seen < n:
            batch = await consumer.getmany(timeout_ms=100, max_records=2000)
            for records in batch.values():
                for r in records:
                    if not first:
                        first.append(time.perf_counter())
                    await relay_out.send(dst, r.value, key=r.key)
                    latencies.append(time.time() * 1000 - r.timestamp)
                    seen += 1
        await relay_out.flush()
        done.set()

    task = asyncio.create_task(relay())
    examples = payments(n, seed=11)
    t0 = time.perf_counter()
    for i, ex in enumerate(examples):
        await producer.send(src, dumps(ex.record), key=ex.key.encode())
        if rate:
            ahead = (i + 1) / rate - (time.perf_counter() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
    await producer.flush()
    await done.wait()
    elapsed = time.perf_counter() - first[0]
    await task
    await asyncio.gather(producer.stop(), relay_out.stop(), consumer.stop())
    return n / elapsed, latencies


def pipeline_run(settings, worker: WorkerProcess, spec, n: int, rate: float | None, seed: int):
    """Records/s from first send to the last prediction row in ClickHouse, and e2e latencies."""
    t0 = time.perf_counter()
    asyncio.run(
        produce_examples(
            settings, spec, payments(n, seed=seed), rate=rate, with_labels=True, label_delay=100
        )
    )
    sql = (
        f"SELECT uniqExact(event_id) FROM predictions WHERE pipeline = '{spec.name}' "
        f"AND startsWith(event_id, 'pay-{seed}-')"
    )
    while int(worker.query(sql)[1][0][0]) < n:
        time.sleep(0.2)
    elapsed = time.perf_counter() - t0
    _, rows = worker.query(
        f"SELECT e2e_latency_ms FROM predictions FINAL WHERE pipeline = '{spec.name}' "
        f"AND startsWith(event_id, 'pay-{seed}-')"
    )
    return n / elapsed, [float(r[0]) for r in rows]


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=100.0, help="events/s for the latency run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = isolated_settings(Path(tmp))
        broker = LocalBroker(settings)
        broker.up()
        try:
            spec_data = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
            spec_data["name"] = "benchpipe"
            folder = Path(tmp) / "pipelines"
            folder.mkdir()
            (folder / "benchpipe.yaml").write_text(yaml.safe_dump(spec_data))
            settings = settings.model_copy(
                update={"pipelines_dir": folder, "kafka_bootstrap": settings.bootstrap_servers}
            )
            [spec] = load_pipelines(folder, ["benchpipe"])
            asyncio.run(ensure_pipeline_topics(settings, [spec]))

            base_tput, _ = asyncio.run(passthrough(settings, args.events, None))
            _, base_lat = asyncio.run(passthrough(settings, int(args.rate * 20), args.rate))

            worker = WorkerProcess(settings, ["benchpipe"], Path(tmp) / "worker.log")
            worker.start()
            try:
                pipe_tput, _ = pipeline_run(settings, worker, spec, args.events, None, 101)
                _, pipe_lat = pipeline_run(
                    settings, worker, spec, int(args.rate * 20), args.rate, 102
                )
            finally:
                worker.stop()
        finally:
            broker.down()
    print(f"passthrough_throughput_eps {base_tput:.0f}")
    print(f"pipeline_throughput_eps {pipe_tput:.0f}")
    print(f"throughput_ratio_pipeline_over_passthrough {pipe_tput / base_tput:.3f}")
    for name, values in (("passthrough", base_lat), ("pipeline", pipe_lat)):
        print(
            f"{name}_latency_ms_at_{args.rate:.0f}eps p50 {quantile(values, 0.5):.1f} "
            f"p99 {quantile(values, 0.99):.1f}"
        )
    print(
        f"latency_p99_ratio_pipeline_over_passthrough "
        f"{quantile(pipe_lat, 0.99) / max(quantile(base_lat, 0.99), 1e-3):.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
