"""Thin aiokafka helpers that fail with a clear error instead of hanging.

Every call is bounded by ``Settings.request_timeout_s``; an unreachable or dead
broker becomes :class:`~streamml.errors.BrokerUnavailableError` naming the
address, never an endless retry loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from streamml.config import Settings
from streamml.errors import BrokerUnavailableError
from streamml.schemas.spec import PipelineSpec

T = TypeVar("T")


@dataclass(frozen=True)
class Message:
    """One consumed record, with where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


async def bounded(what: str, bootstrap: str, aw: Awaitable[T], timeout_s: float) -> T:
    try:
        return await asyncio.wait_for(aw, timeout_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        raise BrokerUnavailableError(
            f"Kafka at {bootstrap} failed to {what} within {timeout_s:.0f} s ({reason})",
            hint="is the broker running? `streamml status` shows it; `streamml up` starts it",
        ) from exc


async def close_quietly(aw: Awaitable[object], timeout_s: float) -> None:
    """Closing must not hang on a dead broker either; what is lost is reported by the caller."""
    with contextlib.suppress(TimeoutError, KafkaError, OSError):
        await asyncio.wait_for(aw, timeout_s)


@asynccontextmanager
async def admin_client(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    bootstrap = settings.bootstrap_servers
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(settings.request_timeout_s * 1000)
    )
    await bounded("connect", bootstrap, admin.start(), settings.request_timeout_s)
    try:
        yield admin
    finally:
        await close_quietly(admin.close(), settings.request_timeout_s)


async def ensure_topics(
    settings: Settings,
    names: Iterable[str],
    partitions: int | None = None,
    config: dict[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    wanted = sorted(set(names))
    bootstrap = settings.bootstrap_servers
    async with admin_client(settings) as admin:
        existing = set(
            await bounded("list topics", bootstrap, admin.list_topics(), settings.request_timeout_s)
        )
        missing = [n for n in wanted if n not in existing]
        if not missing:
            return []
        new = [
            NewTopic(
                name,
                num_partitions=partitions or settings.topic_partitions,
                replication_factor=settings.topic_replication_factor,
                topic_configs=dict(config or {}),
            )
            for name in missing
        ]
        response = await bounded(
            "create topics", bootstrap, admin.create_topics(new), settings.request_timeout_s
        )
    for topic, code, message in _topic_errors(response):
        if code not in (0, TopicAlreadyExistsError.errno):
            raise BrokerUnavailableError(
                f"creating topic {topic!r} failed: {message} (code {code})"
            )
    return missing


def _topic_errors(response: object) -> list[tuple[str, int, str | None]]:
    rows = getattr(response, "topic_errors", [])
    return [(str(r[0]), int(r[1]), r[2] if len(r) > 2 else None) for r in rows]


async def produce(
    settings: Settings,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes]],
    headers: Sequence[tuple[str, bytes]] = (),
) -> list[tuple[int, int]]:
    """Send key/value records with acks=all; return their (partition, offset)."""
    bootstrap = settings.bootstrap_servers
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        request_timeout_ms=int(settings.request_timeout_s * 1000),
        enable_idempotence=True,
    )
    await bounded("connect", bootstrap, producer.start(), settings.request_timeout_s)
    try:
        futures = [
            await producer.send(topic, value=value, key=key, headers=list(headers))
            for key, value in records
        ]
        metas = await bounded(
            f"acknowledge {len(futures)} records on {topic!r}",
            bootstrap,
            asyncio.gather(*futures),
            settings.request_timeout_s,
        )
    finally:
        await close_quietly(producer.stop(), settings.request_timeout_s)
    return [(m.partition, m.offset) for m in metas]


async def consume(
    settings: Settings,
    topics: Sequence[str],
    count: int,
    group_id: str | None = None,
    timeout_s: float | None = None,
) -> list[Message]:
    """Read ``count`` records from the start of ``topics``, or fail after ``timeout_s``."""
    bootstrap = settings.bootstrap_servers
    limit = timeout_s if timeout_s is not None else settings.request_timeout_s
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=group_id is not None,
        request_timeout_ms=int(settings.request_timeout_s * 1000),
        session_timeout_ms=int(settings.session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.heartbeat_interval_s * 1000),
    )
    await bounded("connect", bootstrap, consumer.start(), settings.request_timeout_s)
    got: list[Message] = []
    deadline = time.monotonic() + limit
    try:
        while len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnavailableError(
                    f"read {len(got)} of {count} records from {', '.join(topics)} at {bootstrap} "
                    f"within {limit:.0f} s",
                    hint="is the broker running and are the records produced?",
                )
            batch = await bounded(
                "fetch records",
                bootstrap,
                consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000)),
                left + 1.0,
            )
            for records in batch.values():
                got.extend(
                    Message(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers))
                    for r in records
                )
    finally:
        await close_quietly(consumer.stop(), settings.request_timeout_s)
    return got[:count]


async def fetch_at(settings: Settings, topic: str, partition: int, offset: int) -> Message:
    """Read the one record at topic/partition/offset (no consumer group involved)."""
    from aiokafka import TopicPartition

    bootstrap = settings.bootstrap_servers
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        request_timeout_ms=int(settings.request_timeout_s * 1000),
    )
    await bounded("connect", bootstrap, consumer.start(), settings.request_timeout_s)
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        record = await bounded(
            f"fetch {topic}[{partition}]@{offset}",
            bootstrap,
            consumer.getone(tp),
            settings.request_timeout_s,
        )
    finally:
        await close_quietly(consumer.stop(), settings.request_timeout_s)
    return Message(
        record.topic,
        record.partition,
        record.offset,
        record.key,
        record.value,
        tuple(record.headers),
    )


async def ensure_pipeline_topics(settings: Settings, specs: Iterable[PipelineSpec]) -> list[str]:
    """Create every topic of these pipelines, all with the pipeline's partition count
    (co-partitioning: raw, features, predictions and labels of a key meet in one worker)."""
    from streamml.streams.topics import CONTROL_TOPIC, pipeline_topics, state_topic

    created: list[str] = []
    for spec in specs:
        partitions = spec.topics.partitions or settings.topic_partitions
        created += await ensure_topics(settings, pipeline_topics(spec).values(), partitions)
        created += await ensure_topics(
            settings,
            [state_topic(settings.app_id, spec)],
            partitions,
            config={"cleanup.policy": "compact"},
        )
    created += await ensure_topics(settings, [CONTROL_TOPIC], partitions=1)
    return created
