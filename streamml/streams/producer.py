"""Producing raw records and labels into a pipeline's topics, the way users do.

Records are keyed by the spec's entity key (or event_id without one); labels are keyed
the same way, so they land in the partition that scored the event. With ``label_delay``
d, the label of record i is sent just before record i + d (right after record i when d is
0 or 1): the order river's ``simulate_qa`` / ``progressive_val_score`` uses for
``delay=d``. Every record carries a ``streamml-seq`` header, this producer's running
count: the worker applies a partition's raw records and labels in timestamp order, and
within one millisecond in this order (other producers may set it too).

Delivery is idempotent (``acks=all``, ``enable_idempotence``) and survives a broker
restart: aiokafka retries in place; what still fails with a retriable error is re-sent,
in order, by a fresh producer, until nothing was acknowledged for ``give_up_s``. A
:class:`Ledger` records what Kafka acknowledged, so a later run can skip exactly that
(``streamml produce --resume``, which keeps it in a :class:`FileProgress`). A resume
re-sends only what had no ack: after Ctrl-C nothing twice (the in-flight acks are awaited
first); after a SIGKILL of the producer or a give-up, the messages then in flight (at
most ``window``, reported as failed) may reach Kafka twice: they may have been written
without their ack arriving.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
)

from streamml.config import Settings
from streamml.errors import StreamMLError
from streamml.models.synthetic import Example
from streamml.schemas.spec import PipelineSpec
from streamml.streams.kafka import bounded, client_options, close_quietly
from streamml.streams.ledger import Ledger
from streamml.streams.topics import dumps, pipeline_topics

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
STALL_NOTICE_S = 2.0  # say that Kafka stopped acknowledging after this long
SEQ_HEADER = "streamml-seq"  # read by the engine (agents/engine.py) to order records
# a fresh producer fixes these (its sequence numbers start over); the rest say `retriable`
_RETRY_WITH_NEW_PRODUCER = (
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    InvalidProducerEpoch,
    ProducerFenced,
    ProducerClosed,
    OSError,
    TimeoutError,
)


def _none(_: int) -> None:
    return None


class Send(NamedTuple):
    """One message of the schedule: a raw record or the label of record ``position``."""

    kind: Literal["record", "label"]
    position: int  # of the record in the input (a label: of its record)
    topic: str
    key: bytes
    value: bytes
    seq: int


def schedule(
    examples: Iterable[Example],
    spec: PipelineSpec,
    ledger: Ledger,
    with_labels: bool = True,
    label_delay: int = 0,
    limit: int | None = None,
) -> Generator[Send, None, bool]:
    """The messages to send, in order, leaving out what ``ledger`` holds as acknowledged;
    returns whether it covered the whole input.

    With ``limit`` it stops before the record after ``limit`` sent ones and keeps the labels
    still due (a resumed run sends them in their place), so what it yields is a prefix of
    the full schedule. Records without a label to send are marked label-done in ``ledger``.
    """
    topics = pipeline_topics(spec)
    pending: deque[tuple[int, Example]] = deque()
    gap = max(label_delay, 1)
    seq, records = 0, 0

    def message(kind: Literal["record", "label"], i: int, example: Example) -> Send:
        nonlocal seq
        seq += 1
        if kind == "label":
            assert isinstance(example.record, dict)
            label = {"event_id": example.record.get(spec.schema_.event_id)}
            payload = dumps({**label, spec.label.field: example.label})
        else:
            raw = example.record
            payload = raw if isinstance(raw, bytes) else dumps(raw)
        topic = topics["raw" if kind == "record" else "labels"]
        return Send(kind, i, topic, example.key.encode(), payload, seq)

    for i, example in enumerate(examples):
        while pending and pending[0][0] + gap <= i:  # labels due before record i
            yield message("label", *pending.popleft())
        if i not in ledger.records:
            if limit is not None and records >= limit:
                return False
            records += 1
            yield message("record", i, example)
        if not (with_labels and example.label is not None):
            ledger.labels.add(i)
        elif i not in ledger.labels:
            pending.append((i, example))
            if label_delay <= 1:  # due before the next record: send it now
                yield message("label", *pending.popleft())
    while pending:
        yield message("label", *pending.popleft())
    return True


@dataclass(frozen=True)
class ProduceResult:
    """How far a run got: counts of this run, and ``next_index`` to resume from."""

    delivered: int  # records acknowledged in this run
    labels_delivered: int
    failed: int  # records sent but not acknowledged (refused, or unconfirmed at give-up)
    labels_failed: int
    skipped: int  # records already acknowledged before this run (resume)
    next_index: int  # first record not delivered together with its label
    elapsed_s: float
    complete: bool  # the whole input is delivered
    ledger: Ledger = field(repr=False, compare=False)


class ProduceIncompleteError(StreamMLError, RuntimeError):
    """Some records were not acknowledged; ``result`` says what was and where to resume."""

    def __init__(self, message: str, result: ProduceResult, *, retriable: bool, hint: str):
        super().__init__(message, hint=hint)
        self.result = result
        self.retriable = retriable


@dataclass(frozen=True)
class DeliveryOptions:
    """How hard to try, how much to send, and what is already delivered."""

    give_up_s: float = 300.0  # give up when nothing was acknowledged for this long
    limit: int | None = None  # send at most this many records in this run
    ledger: Ledger | None = None  # skip what it holds; updated as acks arrive
    checkpoint: Callable[[ProduceResult], None] = lambda _: None  # after each ack round
    window: int = 2000  # messages in flight before waiting for their acks


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, _RETRY_WITH_NEW_PRODUCER) or bool(getattr(exc, "retriable", False))


class _Delivery:
    """Sends messages and settles their acks: re-sends retriable failures in order with a
    fresh producer and backoff, and gives up after ``give_up_s`` without an ack."""

    def __init__(self, settings: Settings, options: DeliveryOptions, ledger: Ledger) -> None:
        self.settings, self.options, self.ledger = settings, options, ledger
        self.producer: AIOKafkaProducer | None = None
        self.inflight: list[tuple[Send, asyncio.Future[Any] | None]] = []  # None: not sent
        self.blocked: tuple[Send, BaseException] | None = None  # a send raised: hold the rest
        self.last_error: BaseException | None = None
        self.last_ack = time.monotonic()  # or the start of the round waiting for acks
        self.counts = {"record": 0, "label": 0}
        self.stalled = False  # the stall was reported
        self.gave_up = False  # messages are still in flight: do not wait long on close

    async def start(self) -> None:
        timeout_s = self.settings.request_timeout_s
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap_servers,
            acks="all",
            linger_ms=5,
            request_timeout_ms=int(timeout_s * 1000),
            enable_idempotence=True,
            max_batch_size=262_144,
            **client_options(self.settings),
        )
        try:
            await bounded("connect", self.settings.bootstrap_servers, producer.start(), timeout_s)
        except BaseException:
            await close_quietly(producer.stop(), timeout_s)
            raise
        self.producer = producer

    async def close(self) -> None:
        if self.producer is not None:
            timeout_s = 1.0 if self.gave_up else self.settings.request_timeout_s
            await close_quietly(self.producer.stop(), timeout_s)
            self.producer = None

    async def push(self, send: Send, fresh: bool = True) -> None:
        """Hand ``send`` to the producer (``fresh``: not a re-send, may start a round)."""
        if fresh and not self.inflight:
            self.last_ack = time.monotonic()
        future = None
        if self.blocked is None and self.producer is not None:
            try:
                headers = [(SEQ_HEADER, str(send.seq).encode())]
                future = await self.producer.send(
                    send.topic, send.value, key=send.key, headers=headers
                )
            except (KafkaError, OSError) as exc:
                self.blocked, self.last_error = (send, exc), exc
        self.inflight.append((send, future))

    def _stalled_s(self) -> float:
        return time.monotonic() - self.last_ack

    def _acked(self) -> None:
        if self.stalled:
            log.warning(
                "Kafka at %s acknowledges again after %.0f s",
                self.settings.bootstrap_servers,
                self._stalled_s(),
            )
        self.last_ack, self.stalled = time.monotonic(), False

    async def _wait(self) -> None:
        """Wait for the in-flight futures while some ack came within ``give_up_s``."""
        give_up_s = self.options.give_up_s
        undone = {f for _, f in self.inflight if f is not None and not f.done()}
        while undone and self._stalled_s() < give_up_s:
            timeout_s = min(1.0, give_up_s - self._stalled_s())
            done, undone = await asyncio.wait(undone, timeout=timeout_s)
            if any(not f.cancelled() and f.exception() is None for f in done):
                self._acked()
            elif not self.stalled and self._stalled_s() > STALL_NOTICE_S:
                self.stalled = True
                log.warning(
                    "Kafka at %s has acknowledged nothing for %.0f s; retrying for up to %.0f s",
                    self.settings.bootstrap_servers,
                    self._stalled_s(),
                    give_up_s,
                )

    def _collect(self) -> tuple[list[Send], list[Send], list[Send]]:
        """Record what is acknowledged; return (to re-send, refused, unconfirmed), in order."""
        retry: list[Send] = []
        refused: list[Send] = []
        unconfirmed: list[Send] = []
        records, labels, counts = self.ledger.records, self.ledger.labels, self.counts
        for send, future in self.inflight:
            if (
                future is not None
                and future.done()
                and not future.cancelled()
                and future.exception() is None
            ):
                (records if send.kind == "record" else labels).add(send.position)
                counts[send.kind] += 1
            elif future is None:
                exc = self.blocked[1] if self.blocked and self.blocked[0] is send else None
                (retry if exc is None or _retriable(exc) else refused).append(send)
            elif not future.done():
                unconfirmed.append(send)
            else:
                exc = None if future.cancelled() else future.exception()
                self.last_error = exc or self.last_error
                (retry if exc is None or _retriable(exc) else refused).append(send)
        self.inflight, self.blocked = [], None
        return retry, refused, unconfirmed

    async def settle(self, give_up: Callable[[str, list[Send], bool], BaseException]) -> None:
        """Return once everything pushed is acknowledged; raise ``give_up(...)`` if it is not."""
        backoff_s, give_up_s = 0.5, self.options.give_up_s
        while True:
            await self._wait()
            retry, refused, unconfirmed = self._collect()
            self.gave_up = bool(refused or unconfirmed)
            if refused:
                reason = f"Kafka refused a message ({_describe(self.last_error)})"
                raise give_up(reason, refused + retry + unconfirmed, False)
            if unconfirmed or (retry and self._stalled_s() >= give_up_s):
                reason = (
                    f"Kafka at {self.settings.bootstrap_servers} acknowledged nothing for "
                    f"{give_up_s:.0f} s"
                )
                if self.last_error is not None:
                    reason += f" (last error: {_describe(self.last_error)})"
                raise give_up(reason, retry + unconfirmed, True)
            if not retry:
                return
            log.warning(
                "re-sending %d messages Kafka did not take (%s)",
                len(retry),
                _describe(self.last_error),
            )
            # re-send what failed, in order, with a fresh producer (clean sequence numbers)
            await asyncio.sleep(min(backoff_s, give_up_s - self._stalled_s()))
            backoff_s = min(backoff_s * 2, 5.0)
            await self.close()
            try:
                await self.start()
            except StreamMLError as exc:
                self.last_error = exc
            for send in retry:
                await self.push(send, fresh=False)

    async def salvage(self) -> None:
        """On cancel: give the in-flight messages a moment, and record those acknowledged."""
        pending = {f for _, f in self.inflight if f is not None and not f.done()}
        if pending:
            await asyncio.wait(pending, timeout=self.settings.request_timeout_s)
        self._collect()


def _describe(exc: BaseException | None) -> str:
    return "none" if exc is None else f"{type(exc).__name__}: {exc}".rstrip(": ")


async def produce_examples(
    settings: Settings,
    spec: PipelineSpec,
    examples: Iterable[Example],
    rate: float | None = None,
    with_labels: bool = True,
    label_delay: int = 0,
    progress: Progress = _none,
    delivery: DeliveryOptions | None = None,
) -> ProduceResult:
    """Send records (and their labels) that ``delivery.ledger`` does not hold yet.

    Raises :class:`ProduceIncompleteError` (with the result) when Kafka refuses a message
    or acknowledges nothing for ``give_up_s``; the ledger then holds what was delivered.
    """
    options = delivery or DeliveryOptions()
    ledger = options.ledger if options.ledger is not None else Ledger()
    skipped = len(ledger.records)
    state = _Delivery(settings, options, ledger)
    started = time.perf_counter()
    sent = 0

    def result(complete: bool, failed: Iterable[Send] = ()) -> ProduceResult:
        kinds = [send.kind for send in failed]
        return ProduceResult(
            delivered=state.counts["record"],
            labels_delivered=state.counts["label"],
            failed=kinds.count("record"),
            labels_failed=kinds.count("label"),
            skipped=skipped,
            next_index=ledger.next_index,
            elapsed_s=time.perf_counter() - started,
            complete=complete,
            ledger=ledger,
        )

    def give_up(reason: str, failed: list[Send], retriable: bool) -> ProduceIncompleteError:
        outcome = result(False, failed)
        options.checkpoint(outcome)
        hint = (
            "once the broker answers again (`streamml status`), resuming re-sends only "
            "what was not acknowledged"
            if retriable
            else f"retrying does not help: fix record {failed[0].position} of the input"
        )
        return ProduceIncompleteError(
            f"{reason}: delivered {outcome.delivered} records (+{outcome.labels_delivered} "
            f"labels); {outcome.failed} records (+{outcome.labels_failed} labels) not "
            f"acknowledged; resume point: record {outcome.next_index}",
            outcome,
            retriable=retriable,
            hint=hint,
        )

    async def settle() -> None:
        await state.settle(give_up)
        options.checkpoint(result(False))
        progress(skipped + state.counts["record"])

    await state.start()
    try:
        plan = schedule(examples, spec, ledger, with_labels, label_delay, options.limit)
        last_settle = time.monotonic()
        while True:
            try:
                send = next(plan)
            except StopIteration as stop:
                whole_input = bool(stop.value)
                break
            await state.push(send)
            sent += send.kind == "record"
            now = time.monotonic()
            if state.blocked or len(state.inflight) >= options.window or now - last_settle > 1:
                await settle()
                last_settle = time.monotonic()
            if rate and send.kind == "record":
                ahead = sent / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await settle()
    except asyncio.CancelledError:
        await state.salvage()
        options.checkpoint(result(False))
        raise
    finally:
        await state.close()
    outcome = result(whole_input)
    options.checkpoint(outcome)
    return outcome


def count_records(path: Path) -> int:
    """How many records ``read_file`` yields from ``path`` (without parsing them)."""
    with path.open(newline="") as handle:
        if path.suffix == ".csv":
            return max(sum(1 for _ in csv.reader(handle)) - 1, 0)
        return sum(1 for line in handle if line.strip())


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
