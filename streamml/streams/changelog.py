"""Read back a compacted changelog: the latest value of every key of some partitions."""

from __future__ import annotations

import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from streamml.config import Settings
from streamml.errors import BrokerUnavailableError
from streamml.streams.kafka import bounded, client_options, close_quietly

# key -> (value, Kafka timestamp ms); deleted keys (tombstones) are absent
Log = dict[bytes, tuple[bytes, int]]


async def read_latest(settings: Settings, topic: str, partitions: Iterable[int]) -> dict[int, Log]:
    """Per partition, the latest value of each key, reading from the start to the end
    offsets as they are when called (what the previous owner wrote before it let go)."""
    tps = [TopicPartition(topic, p) for p in partitions]
    out: dict[int, Log] = {tp.partition: {} for tp in tps}
    if not tps:
        return out
    boot = settings.bootstrap_servers
    consumer = AIOKafkaConsumer(
        bootstrap_servers=boot,
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=4 << 20,
        request_timeout_ms=int(settings.request_timeout_s * 1000),
        **client_options(settings),
    )
    timeout_s = settings.request_timeout_s
    await bounded("read the state changelog", boot, consumer.start(), timeout_s)
    try:
        consumer.assign(tps)
        start = await bounded(
            "read changelog offsets", boot, consumer.beginning_offsets(tps), timeout_s
        )
        end = await bounded("read changelog offsets", boot, consumer.end_offsets(tps), timeout_s)
        remaining = {tp for tp in tps if end[tp] > start[tp]}
        for tp in remaining:
            consumer.seek(tp, start[tp])
        deadline = time.monotonic() + max(60.0, timeout_s)
        while remaining:
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(
                    f"reading {topic} did not reach its end offsets in time",
                    hint="check the broker, or raise STREAMML_REQUEST_TIMEOUT_S",
                )
            batch = await consumer.getmany(*remaining, timeout_ms=200, max_records=50_000)
            for tp, records in batch.items():
                log = out[tp.partition]
                for record in records:
                    if record.offset >= end[tp] or record.key is None:
                        continue
                    if record.value is None:
                        log.pop(record.key, None)
                    else:
                        log[record.key] = (record.value, record.timestamp)
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
    finally:
        await close_quietly(consumer.stop(), timeout_s)
    return out
