"""The records a batch of work produces, sent to Kafka as whole record batches.

Per-record ``producer.send()`` costs a future and a few event-loop callbacks per record;
appending to one aiokafka ``BatchBuilder`` per topic-partition and submitting the
builders at the end of the batch costs a fraction of that. :meth:`Outbox.flush` returns
once the broker has acknowledged every record, so the caller may then commit the input
offsets (at-least-once).

A broker that restarts, or a partition whose leader moves, is weather: :meth:`flush`
keeps the records until they are acknowledged and sends again, with backoff, what was not
(a partition's records from its first unacknowledged batch on, so the last value of a
compacted key stays the last one written). Meanwhile ``health`` says why it waits. A
record that could never be sent (over :data:`MAX_RECORD_BYTES`) is refused by
:meth:`Outbox.add` with :class:`RecordTooLargeError`, so the caller can make it a dead
letter instead of a batch the broker refuses for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streamml.errors import BrokerUnavailableError, StreamMLError

Headers = Sequence[tuple[str, bytes]]
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]

MAX_RECORD_BYTES = 512 * 1024  # key + value; a batch holds at least one, under 1 MiB
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0

log = logging.getLogger("streamml.outbox")


class RecordTooLargeError(StreamMLError, ValueError):
    """One output record is larger than a Kafka message may be; retrying cannot help."""


@dataclass
class Health:
    """What the outboxes of one producer are waiting for, shown on /health."""

    waiting_since: float | None = None  # time.monotonic() of the first failed send
    unreachable_since: float | None = None  # ... of the first failed metadata probe
    last_error: str = ""
    retries: int = 0

    @property
    def degraded(self) -> bool:
        return self.waiting_since is not None or self.unreachable_since is not None

    def describe(self) -> dict[str, Any]:
        since = [t for t in (self.waiting_since, self.unreachable_since) if t is not None]
        return {
            "degraded": self.degraded,
            "waiting_s": round(time.monotonic() - min(since), 1) if since else 0.0,
            "last_error": self.last_error,
            "retries": self.retries,
        }


class Outbox:
    """Collects output records per (topic, partition) and sends them as record batches."""

    def __init__(self, producer: AIOKafkaProducer, health: Health | None = None) -> None:
        self._producer = producer
        self._records: dict[tuple[str, int], list[Record]] = {}
        self._journal: list[list[Record]] = []  # the queue each record went to, in order
        self.health = health if health is not None else Health()
        self.records = 0

    def add(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = (),
    ) -> None:
        """Queue one record (``value=None`` is a tombstone). Nothing is sent before flush()."""
        size = len(key or b"") + len(value or b"")
        if size > MAX_RECORD_BYTES:
            raise RecordTooLargeError(
                f"an output record for {topic} of {size} bytes is over {MAX_RECORD_BYTES}",
                hint="a field or feature is far larger than the spec's limits expect",
            )
        queue = self._records.get((topic, partition))
        if queue is None:
            queue = self._records[topic, partition] = []
        queue.append((key, value, headers if isinstance(headers, list) else list(headers)))
        self._journal.append(queue)
        self.records += 1

    def mark(self) -> int:
        """A point to :meth:`rollback` to: what one input record adds is all or nothing."""
        return len(self._journal)

    def rollback(self, mark: int) -> None:
        """Drop every record added since ``mark`` (a step failed half-way through them).

        >>> class _P:
        ...     pass
        >>> out = Outbox(_P())  # type: ignore[arg-type]
        >>> out.add("t", 0, b"k", b"a")
        >>> m = out.mark()
        >>> out.add("t", 0, b"k", b"b"); out.add("u", 1, None, b"c")
        >>> out.rollback(m)
        >>> out.records, out._records[("t", 0)]
        (1, [(b'k', b'a', [])])
        """
        while len(self._journal) > mark:
            self._journal.pop().pop()
            self.records -= 1

    async def flush(self, give_up_s: float | None = None) -> int:
        """Send everything queued and wait until the broker acknowledged it all.

        Returns the number of records sent. Retriable failures (broker down, leader moved,
        timeouts) are retried with backoff until they succeed, which may be long: the
        caller holds its input offsets meanwhile. Cancellation (the worker stopping)
        interrupts it; nothing is committed then, and the next owner reads again. With
        ``give_up_s`` (a worker shutting down), it raises :class:`BrokerUnavailableError`
        after that long instead."""
        pending, self._records, self._journal = self._records, {}, []
        pending = {tp: records for tp, records in pending.items() if records}
        sent, self.records = self.records, 0
        delay = RETRY_FIRST_S
        started = time.monotonic()
        while pending:
            pending = await self._send(pending)
            if not pending:
                break
            if give_up_s is not None and time.monotonic() - started > give_up_s:
                raise BrokerUnavailableError(
                    f"Kafka did not acknowledge {sum(len(r) for r in pending.values())} "
                    f"records within {give_up_s:.0f} s ({self.health.last_error})",
                    hint="their input was not committed: it is read again",
                )
            self.health.retries += 1
            if self.health.waiting_since is None:
                self.health.waiting_since = time.monotonic()
            log.warning(
                "Kafka did not acknowledge %d records (%s); sending them again in %.1f s",
                sum(len(r) for r in pending.values()),
                self.health.last_error,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
        if self.health.waiting_since is not None and sent:
            waited = time.monotonic() - self.health.waiting_since
            log.warning("Kafka acknowledged again after %.1f s", waited)
        self.health.waiting_since = None
        return sent

    async def _send(
        self, pending: dict[tuple[str, int], list[Record]]
    ) -> dict[tuple[str, int], list[Record]]:
        """One attempt; returns what is still unacknowledged, per partition (the records
        from its first failed batch on)."""
        started: list[tuple[tuple[str, int], list[Record], Any]] = []
        failed: dict[tuple[str, int], list[Record]] = {}
        for tp, records in pending.items():
            for chunk in self._chunks(records):
                if tp in failed:  # an earlier batch of it failed: keep the order
                    failed[tp].extend(chunk[1])
                    continue
                try:
                    future = await self._producer.send_batch(chunk[0], tp[0], partition=tp[1])
                except KafkaError as exc:
                    self._failed(exc)
                    failed[tp] = list(chunk[1])
                    continue
                started.append((tp, chunk[1], future))
        results = await asyncio.gather(*(f for _, _, f in started), return_exceptions=True)
        for (tp, records, _), result in zip(started, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, KafkaError | OSError | TimeoutError):
                    raise result
                self._failed(result)
                failed[tp] = failed.get(tp, []) + records
        return {tp: self._resend_order(tp, pending[tp], failed[tp]) for tp in failed}

    @staticmethod
    def _resend_order(
        tp: tuple[str, int], records: list[Record], unacked: list[Record]
    ) -> list[Record]:
        """The partition's records from its first unacknowledged one on, in their order."""
        ids = {id(r) for r in unacked}
        for i, record in enumerate(records):
            if id(record) in ids:
                return records[i:]
        return list(unacked)

    def _failed(self, exc: BaseException) -> None:
        self.health.last_error = f"{type(exc).__name__}: {exc}"[:500]
        if not getattr(exc, "retriable", True):  # e.g. not authorized: a person must act
            log.error("Kafka refused a batch, and will until this is fixed: %s", exc)

    def _chunks(self, records: list[Record]) -> list[tuple[Any, list[Record]]]:
        """The records as record batches, each with the records it holds."""
        chunks: list[tuple[Any, list[Record]]] = []
        builder, held = self._producer.create_batch(), list[Record]()
        for record in records:
            key, value, headers = record
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                chunks.append((builder, held))
                builder, held = self._producer.create_batch(), list[Record]()
                builder.append(key=key, value=value, timestamp=None, headers=headers)
            held.append(record)
        chunks.append((builder, held))
        return chunks
