"""Producing raw records and labels into a pipeline's topics, the way users do.

Records are keyed by the spec's entity key (or event_id without one); labels are keyed
the same way, so they land in the partition that scored the event. With ``label_delay``
d, the label of record i is sent just before record i + d (right after record i when d is
0 or 1): the order river's ``simulate_qa`` / ``progressive_val_score`` uses for
``delay=d``. Every record carries a ``streamml-seq`` header, this producer's running
count: the worker applies a partition's raw records and labels in timestamp order, and
within one millisecond in this order (other producers may set it too).
"""

from __future__ import annotations

import asyncio
import csv
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from streamml.config import Settings
from streamml.models.synthetic import Example
from streamml.schemas.spec import PipelineSpec
from streamml.streams.kafka import bounded, close_quietly
from streamml.streams.topics import dumps, pipeline_topics

Progress = Callable[[int], None]
SEQ_HEADER = "streamml-seq"  # read by the engine (agents/engine.py) to order records


def _none(_: int) -> None:
    return None


async def produce_examples(
    settings: Settings,
    spec: PipelineSpec,
    examples: Iterable[Example],
    rate: float | None = None,
    with_labels: bool = True,
    label_delay: int = 0,
    progress: Progress = _none,
) -> int:
    """Send records (and their labels); return how many records were sent."""
    topics = pipeline_topics(spec)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        linger_ms=5,
        request_timeout_ms=int(settings.request_timeout_s * 1000),
        enable_idempotence=True,
        max_batch_size=262_144,
    )
    bootstrap = settings.bootstrap_servers
    await bounded("connect", bootstrap, producer.start(), settings.request_timeout_s)
    pending: deque[tuple[int, Example]] = deque()
    futures: list[asyncio.Future[Any]] = []
    sent = 0
    seq = [0]
    started = time.perf_counter()

    def order() -> list[tuple[str, bytes]]:
        seq[0] += 1
        return [(SEQ_HEADER, str(seq[0]).encode())]

    async def send_label(example: Example) -> None:
        assert isinstance(example.record, dict)
        value = {
            "event_id": example.record.get(spec.schema_.event_id),
            spec.label.field: example.label,
        }
        futures.append(
            await producer.send(
                topics["labels"], dumps(value), key=example.key.encode(), headers=order()
            )
        )

    try:
        gap = max(label_delay, 1)
        for i, example in enumerate(examples):
            while pending and pending[0][0] + gap <= i:  # labels due before record i
                await send_label(pending.popleft()[1])
            payload = example.record if isinstance(example.record, bytes) else dumps(example.record)
            futures.append(
                await producer.send(
                    topics["raw"], payload, key=example.key.encode(), headers=order()
                )
            )
            sent += 1
            if with_labels and example.label is not None:
                pending.append((i, example))
                if label_delay <= 1:  # due before the next record: send it now
                    await send_label(pending.popleft()[1])
            if len(futures) >= 2000:
                await bounded(
                    "acknowledge records",
                    bootstrap,
                    asyncio.gather(*futures),
                    settings.request_timeout_s,
                )
                futures.clear()
                progress(sent)
            if rate:
                ahead = sent / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        while pending:
            await send_label(pending.popleft()[1])
        await bounded(
            "acknowledge records", bootstrap, asyncio.gather(*futures), settings.request_timeout_s
        )
        progress(sent)
    finally:
        await close_quietly(producer.stop(), settings.request_timeout_s)
    return sent


def read_file(path: Path, spec: PipelineSpec) -> Iterator[Example]:
    """Records from a CSV or JSON-lines file; a label column/key travels as the label."""
    label_field = spec.label.field
    key_field = spec.schema_.entity_key

    def example(row: dict[str, Any], i: int) -> Example:
        label = row.pop(label_field, None)
        key = str(row.get(key_field) if key_field else row.get(spec.schema_.event_id, i))
        return Example(key, row, label)

    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            for i, row in enumerate(csv.DictReader(handle)):
                yield example({k: _csv_value(v) for k, v in row.items()}, i)
    else:
        with path.open() as handle:
            for i, line in enumerate(handle):
                if line.strip():
                    yield example(json.loads(line), i)


def _csv_value(text: str) -> Any:
    if text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text in ("true", "false", "True", "False"):
        return text.lower() == "true"
    return text
