"""The records a batch of work produces, sent to Kafka as whole record batches.

Per-record ``producer.send()`` costs a future and a few event-loop callbacks per record;
appending to one aiokafka ``BatchBuilder`` per topic-partition and submitting the
builders at the end of the batch costs a fraction of that. :meth:`Outbox.flush` returns
once the broker has acknowledged every record, so the caller may then commit the input
offsets (at-least-once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

Headers = Sequence[tuple[str, bytes]]


class Outbox:
    """Collects output records per (topic, partition) and sends them as record batches."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._open: dict[tuple[str, int], Any] = {}
        self._full: list[tuple[str, int, Any]] = []
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
        if not isinstance(headers, list):
            headers = list(headers)  # the record builder takes only a list
        tp = (topic, partition)
        builder = self._open.get(tp)
        if builder is None:
            builder = self._open[tp] = self._producer.create_batch()
        if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
            # the builder is full: keep it for flush() and start another for this partition
            self._full.append((topic, partition, builder))
            builder = self._open[tp] = self._producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                raise ValueError(f"a record of {len(value or b'')} bytes does not fit a batch")
        self.records += 1

    async def flush(self) -> int:
        """Send everything queued and wait until the broker acknowledged it all.

        Returns the number of records sent. A delivery failure (after the producer's own
        retries) raises, and the caller must not commit its input offsets."""
        batches = self._full + [(t, p, b) for (t, p), b in self._open.items()]
        self._full, self._open = [], {}
        sent, self.records = self.records, 0
        if not batches:
            return 0
        futures = [
            await self._producer.send_batch(builder, topic, partition=partition)
            for topic, partition, builder in batches
        ]
        await asyncio.gather(*futures)
        return sent
