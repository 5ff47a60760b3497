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

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamml.devstack import LocalBroker
from streamml.devstack.worker import WorkerProcess
from streamml.models.features import Featurizer, GlobalState
from streamml.models.online import OnlineLearner, coerce_label, new_metrics
from streamml.models.synthetic import payments
from streamml.schemas.catalog import load_pipelines
from streamml.schemas.records import Source, validate
from streamml.streams.kafka import client_options, ensure_pipeline_topics, ensure_topics
from streamml.streams.producer import produce_examples
from streamml.streams.topics import dumps
from streamml.testing import isolated_settings

ROOT = Path(__file__).resolve().parents[1]


async def _preload(settings, topic: str, n: int) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, linger_ms=5, **client_options(settings)
    )
    await producer.start()
    try:
        for ex in payments(n, seed=11):
            await producer.send(topic, dumps(ex.record), key=ex.key.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def passthrough_drain(settings, n: int) -> float:
    """Records/s of consume -> produce over a backlog of ``n`` records."""
    tag = f"pt{int(time.time() * 1000)}"
    src, dst = f"bench.{tag}.in", f"bench.{tag}.out"
    await ensure_topics(settings, [src, dst], partitions=6)
    await _preload(settings, src, n)
    boot = settings.bootstrap_servers
    relay_out = AIOKafkaProducer(bootstrap_servers=boot, linger_ms=2, **client_options(settings))
    consumer = AIOKafkaConsumer(
        src,
        bootstrap_servers=boot,
        group_id=tag,
        auto_offset_reset="earliest",
        **client_options(settings),
    )
    await asyncio.gather(relay_out.start(), consumer.start())
    seen, t0 = 0, None
    while seen < n:
        batch = await consumer.getmany(timeout_ms=100, max_records=2000)
        for records in batch.values():
            if t0 is None:
                t0 = time.perf_counter()
            for r in records:
                await relay_out.send(dst, r.value, key=r.key)
                seen += 1
    await relay_out.flush()
    elapsed = time.perf_counter() - (t0 or 0)
    await asyncio.gather(relay_out.stop(), consumer.stop())
    return n / elapsed


async def passthrough_latency(settings, n: int, rate: float) -> list[float]:
    """Per-record latency (ms, producer timestamp -> relayed) at ``rate`` records/s."""
    tag = f"pl{int(time.time() * 1000)}"
    src, dst = f"bench.{tag}.in", f"bench.{tag}.out"
    await ensure_topics(settings, [src, dst], partitions=6)
    boot = settings.bootstrap_servers
    producer = AIOKafkaProducer(bootstrap_servers=boot, linger_ms=5, **client_options(settings))
    relay_out = AIOKafkaProducer(bootstrap_servers=boot, linger_ms=2, **client_options(settings))
    consumer = AIOKafkaConsumer(
        src,
        bootstrap_servers=boot,
        group_id=tag,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
        **client_options(settings),
    )
    await asyncio.gather(producer.start(), relay_out.start(), consumer.start())
    latencies: list[float] = []

    async def relay() -> None:
        while len(latencies) < n:
            batch = await consumer.getmany(timeout_ms=100, max_records=2000)
            for records in batch.values():
                for r in records:
                    await relay_out.send(dst, r.value, key=r.key)
                    latencies.append(time.time() * 1000 - r.timestamp)
        await relay_out.flush()

    task = asyncio.create_task(relay())
    t0 = time.perf_counter()
    for i, ex in enumerate(payments(n, seed=12)):
        await producer.send(src, dumps(ex.record), key=ex.key.encode())
        ahead = (i + 1) / rate - (time.perf_counter() - t0)
        if ahead > 0:
            await asyncio.sleep(ahead)
    await producer.flush()
    await task
    await asyncio.gather(producer.stop(), relay_out.stop(), consumer.stop())
    return latencies


def _count_sql(spec, seed: int) -> str:
    return (
        f"SELECT uniqExact(event_id) FROM predictions WHERE pipeline = '{spec.name}' "
        f"AND startsWith(event_id, 'pay-{seed}-')"
    )


async def _emitted_range(settings, topic: str, seed: int, n: int) -> tuple[float, float]:
    """First and last ``emitted_ms`` of the predictions of run ``seed`` (read afterwards)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        **client_options(settings),
    )
    await consumer.start()
    lo, hi, seen, prefix = float("inf"), 0.0, set(), f"pay-{seed}-"
    try:
        while len(seen) < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if not batch:
                break
            for records in batch.values():
                for r in records:
                    v = orjson.loads(r.value)
                    if v["event_id"].startswith(prefix):
                        seen.add(v["event_id"])
                        lo, hi = min(lo, v["emitted_ms"]), max(hi, v["emitted_ms"])
    finally:
        await consumer.stop()
    return lo, hi


def pipeline_drain(settings, spec, n: int, tmp: Path) -> tuple[float, float]:
    """A worker started on a backlog of ``n`` events (and their labels, 100 events late).

    Returns events/s to ClickHouse (first prediction emitted -> the last prediction row
    queryable) and events/s to the predictions topic (first -> last emitted)."""
    seed = 101
    asyncio.run(
        produce_examples(settings, spec, payments(n, seed=seed), with_labels=True, label_delay=100)
    )
    worker = WorkerProcess(settings, ["benchpipe"], tmp / "worker-drain.log")
    worker.start()
    try:
        while int(worker.query(_count_sql(spec, seed))[1][0][0]) < n:
            time.sleep(0.05)
        done_ms = time.time() * 1000
    finally:
        worker.stop()
    lo, hi = asyncio.run(_emitted_range(settings, spec.topic("predictions"), seed, n))
    return n / ((done_ms - lo) / 1000), n / max((hi - lo) / 1000, 1e-3)


def pipeline_latency(settings, spec, n: int, rate: float, tmp: Path) -> list[float]:
    """Event -> prediction latency (ms) of a running worker fed at ``rate`` events/s."""
    seed = 102
    worker = WorkerProcess(settings, ["benchpipe"], tmp / "worker-latency.log")
    worker.start()
    try:
        asyncio.run(
            produce_examples(
                settings, spec, payments(n, seed=seed), rate=rate, with_labels=True, label_delay=100
            )
        )
        while int(worker.query(_count_sql(spec, seed))[1][0][0]) < n:
            time.sleep(0.2)
        _, rows = worker.query(
            f"SELECT e2e_latency_ms FROM predictions FINAL WHERE pipeline = '{spec.name}' "
            f"AND startsWith(event_id, 'pay-{seed}-')"
        )
    finally:
        worker.stop()
    return [float(r[0]) for r in rows]


def core_only(spec, n: int) -> float:
    """Events/s of the pipeline's own compute in one process, without Kafka: validate,
    featurize, predict, then the label's prequential learn step and its minute metrics."""
    featurizer, stats, learner = Featurizer(spec), GlobalState(), OnlineLearner(spec)
    minute, windows = new_metrics(spec), {}
    examples = list(payments(n, seed=13))
    payloads = [dumps(ex.record) for ex in examples]
    t0 = time.perf_counter()
    for i, (ex, payload) in enumerate(zip(examples, payloads, strict=True)):
        record = validate(spec, payload, Source("raw", 0, i, 0, None))
        vector = featurizer.transform(record, stats, windows.setdefault(record.entity_key, {}))
        dumps({"event_id": record.event_id, "features": vector})
        before = learner.predict(vector)  # served; the label scores it (no second predict)
        learner.learn(vector, ex.label, before)
        learner.score_into(minute, before, coerce_label(ex.label, True))
    return n / (time.perf_counter() - t0)


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s for the latency run")
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
                update={
                    "pipelines_dir": folder,
                    "kafka_bootstrap": settings.bootstrap_servers,
                    # the data plane alone: a drift-triggered retrain inside the worker
                    # (bench/loop.py measures that) would share its cores mid-run
                    "trainer_enabled": False,
                }
            )
            [spec] = load_pipelines(folder, ["benchpipe"])
            asyncio.run(ensure_pipeline_topics(settings, [spec]))

            tmp_path = Path(tmp)
            core_tput = core_only(spec, min(args.events, 20_000))
            base_tput = asyncio.run(passthrough_drain(settings, args.events))
            base_lat = asyncio.run(passthrough_latency(settings, int(args.rate * 20), args.rate))
            pipe_tput, topic_tput = pipeline_drain(settings, spec, args.events, tmp_path)
            pipe_lat = pipeline_latency(settings, spec, int(args.rate * 20), args.rate, tmp_path)
        finally:
            broker.down()
    print(f"passthrough_throughput_eps {base_tput:.0f}")
    print(f"pipeline_throughput_to_predictions_topic_eps {topic_tput:.0f}")
    print(f"pipeline_throughput_eps {pipe_tput:.0f}")
    print(f"throughput_ratio_pipeline_over_passthrough {pipe_tput / base_tput:.3f}")
    print(f"core_only_throughput_eps {core_tput:.0f}")
    print(f"throughput_ratio_pipeline_over_core_only {pipe_tput / core_tput:.3f}")
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
