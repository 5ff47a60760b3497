"""Produce -> consume through the real broker, with a consumer group of two members."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer

from streamml.config import Settings
from streamml.streams import kafka


async def _member(
    settings: Settings,
    topic: str,
    group: str,
    seen: list[tuple[int, bytes]],
    stop: asyncio.Event,
) -> set[int]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group,
        auto_offset_reset="earliest",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )
    await consumer.start()
    partitions: set[int] = set()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                partitions.add(tp.partition)
                seen.extend((tp.partition, r.value) for r in records)
            if batch:
                await consumer.commit()
    finally:
        await consumer.stop()
    return partitions


async def _roundtrip(settings: Settings) -> None:
    topic = f"test.roundtrip.{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:8]}"
    assert await kafka.ensure_topics(settings, [topic], partitions=6) == [topic]
    assert await kafka.ensure_topics(settings, [topic], partitions=6) == []  # idempotent

    stop = asyncio.Event()
    seen_a: list[tuple[int, bytes]] = []
    seen_b: list[tuple[int, bytes]] = []
    member_a = asyncio.create_task(_member(settings, topic, group, seen_a, stop))
    member_b = asyncio.create_task(_member(settings, topic, group, seen_b, stop))
    await asyncio.sleep(3)  # let both join before the records arrive

    values = [f"record-{i}".encode() for i in range(600)]
    placed = await kafka.produce(
        settings, topic, [(str(i).encode(), v) for i, v in enumerate(values)]
    )
    assert len(placed) == len(values)

    deadline = asyncio.get_running_loop().time() + 30
    while len(seen_a) + len(seen_b) < len(values):
        assert asyncio.get_running_loop().time() < deadline, "records did not all arrive"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)  # any duplicate would show up now
    stop.set()
    parts_a, parts_b = await asyncio.gather(member_a, member_b)

    received = [v for _, v in seen_a] + [v for _, v in seen_b]
    assert sorted(received) == sorted(values), "lost or duplicated records"
    assert parts_a and parts_b, "both group members should own partitions"
    assert not parts_a & parts_b, "a partition was consumed by both members"
    assert parts_a | parts_b == set(range(6))


def test_two_member_group_splits_partitions_and_loses_nothing(stack_settings: Settings) -> None:
    asyncio.run(_roundtrip(stack_settings))


def test_fetch_at_reads_exactly_the_produced_record(stack_settings: Settings) -> None:
    topic = f"test.fetch.{uuid.uuid4().hex[:8]}"
    asyncio.run(kafka.ensure_topics(stack_settings, [topic]))
    [(partition, offset)] = asyncio.run(
        kafka.produce(stack_settings, topic, [(b"k", b"v1")], headers=[("traceparent", b"x")])
    )
    message = asyncio.run(kafka.fetch_at(stack_settings, topic, partition, offset))
    assert (message.key, message.value) == (b"k", b"v1")
    assert ("traceparent", b"x") in message.headers
