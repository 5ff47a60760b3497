"""Publish to and follow ``streamml.control``.

Every worker follows the whole control topic without a consumer group (each must see
every deployment change, not a share of them), starting from its end: what happened
before the worker started is already in the registry it reads at start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, TopicPartition

from streamml.config import Settings
from streamml.schemas.control import ControlEvent
from streamml.streams.kafka import bounded, client_options, close_quietly, produce
from streamml.streams.topics import CONTROL_TOPIC

log = logging.getLogger("streamml.control")


async def publish(settings: Settings, *events: ControlEvent) -> None:
    """Send events to the control topic, keyed by pipeline (so one pipeline's stay in order)."""
    await produce(settings, CONTROL_TOPIC, [(e.pipeline.encode(), e.to_json()) for e in events])


async def follow(
    settings: Settings, ready: asyncio.Event | None = None
) -> AsyncIterator[ControlEvent]:
    """Control events from now on, forever; ``ready`` is set once positioned at the end."""
    boot = settings.bootstrap_servers
    consumer = AIOKafkaConsumer(
        bootstrap_servers=boot,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=200,
        request_timeout_ms=int(settings.request_timeout_s * 1000),
        **client_options(settings),
    )
    await bounded("follow the control topic", boot, consumer.start(), settings.request_timeout_s)
    try:
        partitions = consumer.partitions_for_topic(CONTROL_TOPIC) or {0}
        tps = [TopicPartition(CONTROL_TOPIC, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the position now, so nothing published after is missed
            await consumer.position(tp)
        if ready is not None:
            ready.set()
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    try:
                        yield ControlEvent.from_json(record.value or b"")
                    except (ValueError, TypeError) as exc:
                        log.warning(
                            "skipping a malformed control event at %d: %s", record.offset, exc
                        )
    finally:
        await close_quietly(consumer.stop(), settings.request_timeout_s)
