"""text + annotate: the language models of a pipeline inside its engine.

* :func:`prefetch`: before a batch is applied, the texts of every raw record of every
  partition ready in it are embedded in one call, in a thread (onnxruntime releases the
  GIL, so the event loop keeps serving heartbeats and fetches). The per-partition step
  below then finds each embedding in the cache: one model call per engine batch.
* :func:`text_step`: the spec's text features (:class:`streamml.models.text.TextFeaturizer`)
  of a partition's batch, merged into each event's vector before scoring. A record whose
  text step raises becomes a ``text_failed`` dead letter; a cluster formed after warm-up
  is reported as data drift.
* :func:`annotate`: after an event is served, its weak label (the zero_shot labeller)
  goes to ``<p>.annotations`` -> ClickHouse ``annotations``, and rides with the event's
  predictions as a ``labeller`` model, so when the true label comes the labeller is scored
  like any model (``metrics`` rows with role ``labeller``, per source). An event where the
  served class and the weak label differ, both confident, is flagged (``flags``).
* :class:`Annotator`: summaries, generative weak labels and the generative judge on a
  sample of events, in a background task with a bounded queue, run in a child process at
  the lowest CPU priority (:mod:`streamml.models.background`): they never delay scoring
  (a full queue drops the sample and counts it). Their records are sent best-effort
  (at most once) to the same topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord

from streamml.agents.ingest import failed
from streamml.agents.runtime import Made, PartitionState, PipelineRuntime
from streamml.agents.score import Scored
from streamml.config import Settings
from streamml.errors import BackgroundProcessDied
from streamml.models import background
from streamml.models.background import LowPriorityProcess
from streamml.models.drift import Detection
from streamml.models.generative import MODEL_VERSION
from streamml.models.online import Prediction
from streamml.schemas.spec import PipelineSpec, ZeroShotFeature
from streamml.streams.outbox import Outbox
from streamml.streams.topics import dumps

log = logging.getLogger("streamml.annotate")


def sampled(event_id: str, share: float, salt: str) -> bool:
    """Whether an event is in a sample of ``share``: by a hash of its id, so a replay
    samples the same events.

    >>> sum(sampled(f"e{i}", 0.1, "summary") for i in range(10_000))  # about 1,000
    1044
    >>> sampled("e1", 0.0, "x"), sampled("e1", 1.0, "x")
    (False, True)
    """
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    return zlib.crc32(f"{salt}:{event_id}".encode()) / 2**32 < share


async def prefetch(rt: PipelineRuntime, messages: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
    """Embed the texts of these raw records (all partitions of an engine batch) in one
    call in a thread, so each partition's text step finds them cached."""
    text = rt.text
    if text is None or not text.embedded_fields or not messages:
        return
    texts: list[str] = []
    for message in messages:
        try:
            record = orjson.loads(message.value or b"")
        except orjson.JSONDecodeError:
            continue  # validation makes it a dead letter
        if isinstance(record, dict):
            texts.extend(v for f in text.embedded_fields if isinstance(v := record.get(f), str))
    if texts:
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(text.embedder.embed, texts)
        except Exception as exc:  # never the end of the worker: the text step finds the
            rt.counters["text.prefetch_failed"] += 1  # record that fails, alone
            log.warning("%s: embedding a batch failed (%s); per record", rt.name, exc)
            return
        rt.counters["text.prefetched"] += len(texts)
        rt.counters["text.prefetch_ms"] += int((time.perf_counter() - t0) * 1000)


def text_step(
    rt: PipelineRuntime, state: PartitionState, items: dict[int, Scored], out: Outbox
) -> None:
    """The text features of a partition's batch into each event's vector; an event whose
    text features fail becomes a dead letter (and leaves the batch)."""
    text = rt.text
    if text is None or not items:
        return
    keys = list(items)
    try:
        result = text.transform_many([items[k].record for k in keys], state.stats)
    except Exception:  # find the records that fail; the others go on
        for k in keys:
            try:
                one = text.transform_many([items[k].record], state.stats)
            except Exception as exc:
                it = items.pop(k)
                failed(rt, it.message, "text", exc, out, it.headers)
                continue
            _merge(items[k], one.vectors[0], one.weak[0])
            _new_clusters(rt, state, [items[k]], one.new_clusters)
        state.stats_dirty = True
        return
    for k, vector, weak in zip(keys, result.vectors, result.weak, strict=True):
        _merge(items[k], vector, weak)
    _new_clusters(rt, state, [items[k] for k in keys], result.new_clusters)
    state.stats_dirty = True
    rt.counters["text.featurized"] += len(keys)


def _merge(it: Scored, vector: dict[str, float], weak: tuple[str, float] | None) -> None:
    it.vector.update(vector)
    it.weak = weak


def _new_clusters(
    rt: PipelineRuntime, state: PartitionState, batch: list[Scored], found: list[Any]
) -> None:
    for nc in found:
        rt.counters["text.new_clusters"] += 1
        detection = Detection(
            "new_cluster",
            "data",
            f"{nc.feature}#{nc.cluster}",
            float(nc.clusters),
            0.0,
            nc.clusters,
            nc.clusters,
        )
        state.detections.append((detection, batch[nc.index].record.ts_ms, None))


def _confidence(p: Prediction) -> float:
    """How sure a served class prediction was: its class probability (0 when unknown, as
    for a model that has not learned yet and predicts nothing)."""
    return float(p.probabilities.get(p.predicted_class, 0.0)) if p.predicted_class else 0.0


def annotate(
    rt: PipelineRuntime, state: PartitionState, it: Scored, made: list[Made], out: Outbox
) -> None:
    """The served event's weak label, flag and sampled background jobs (see the module)."""
    spec = rt.spec
    weak_spec, flags = spec.annotate.weak_labels, spec.annotate.flags
    record, partition = it.record, state.partition
    topic = rt.topics.get("annotations")
    if topic is None:
        return
    key = record.event_id.encode()
    if weak_spec is not None and it.weak is not None:
        label, confidence = it.weak
        source, version = rt.labeller_source, rt.labeller_version
        if confidence >= weak_spec.min_confidence:
            value = {
                "kind": "weak_label",
                "event_id": record.event_id,
                "ts_ms": record.ts_ms,
                "source": source,
                "model_version": version,
                "label": label,
                "confidence": confidence,
            }
            out.add(topic, partition, key, dumps(value), it.headers)
            rt.counters["annotations.weak_labels"] += 1
        served = next((m for m in made if m.served), None)
        if flags is not None and served is not None:
            sure = _confidence(served.prediction)
            said = served.prediction.predicted_class
            disagree = bool(said) and said != label  # a model that said nothing is not flagged
            if disagree and sure >= flags.min_confidence and confidence >= flags.min_confidence:
                flag = {
                    "kind": "flag",
                    "event_id": record.event_id,
                    "ts_ms": record.ts_ms,
                    "model_version": served.version,
                    "predicted_class": served.prediction.predicted_class,
                    "served_confidence": sure,
                    "source": source,
                    "weak_label": label,
                    "weak_confidence": confidence,
                }
                out.add(topic, partition, key, dumps(flag), it.headers)
                rt.counters["annotations.flags"] += 1
                if rt.annotator is not None and sampled(
                    record.event_id, flags.judge_sample, "judge"
                ):
                    rt.annotator.offer(Job("judge", partition, record.ts_ms, record, flag))
        if rt.annotator is not None and sampled(
            record.event_id, weak_spec.generative_sample, "label"
        ):
            rt.annotator.offer(Job("label", partition, record.ts_ms, record, {}))
    summaries = spec.annotate.summaries
    if (
        summaries is not None
        and rt.annotator is not None
        and sampled(record.event_id, summaries.sample, "summary")
    ):
        rt.annotator.offer(Job("summary", partition, record.ts_ms, record, {}))


@dataclass
class Job:
    kind: str  # summary | label | judge
    partition: int
    ts_ms: int
    record: Any  # streamml.schemas.records.Record
    flag: dict[str, Any]


class Annotator:
    """Sampled language-model work off the hot path: a bounded queue drained by one
    background task that hands each job to a low-priority process of its own
    (:mod:`streamml.models.background`) and sends its record."""

    def __init__(
        self,
        rt: PipelineRuntime,
        size: int,
        max_busy_share: float = 1.0,
        process: LowPriorityProcess | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.rt = rt
        if cache_dir is None:  # where the text encoder is exported (extractive summaries)
            cache_dir = rt.text.cache_dir if rt.text is not None else Settings().cache_dir
        self.cache_dir = cache_dir
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=size)
        self.max_busy_share = max_busy_share
        self.process = process or LowPriorityProcess()
        self.done = 0
        self.busy_s = 0.0
        self.child: tuple[int, str, int] | None = None  # pid, scheduling class, niceness

    def offer(self, job: Job) -> bool:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.rt.counters[f"annotations.{job.kind}_dropped"] += 1
            return False
        return True

    def describe(self) -> dict[str, Any]:
        """For ``/stats``: the queue, what was done, and the child it runs in."""
        pid, policy, niceness = self.child or (None, None, None)
        return {
            "queued": self.queue.qsize(),
            "done": self.done,
            "busy_s": round(self.busy_s, 3),
            "process": {"pid": pid, "priority": policy, "nice": niceness},
            "restarts": self.process.restarts,
        }

    async def run(self, producer: AIOKafkaProducer) -> None:
        try:
            with contextlib.suppress(Exception):  # start the child now, not at the first job
                self.child = await self.process.call(background.priority)
            while True:
                job = await self.queue.get()
                value = await self._next(job)
                if value is not None:
                    await self._send(producer, job, value)
        finally:
            self.process.close()

    async def _next(self, job: Job) -> dict[str, Any] | None:
        rt = self.rt
        call = self._call(job)
        if call is None:
            return None
        t0 = time.perf_counter()
        try:
            if self.child is None:
                self.child = await self.process.call(background.priority)
            result = await self.process.call(background.run, call)
        except Exception as exc:  # a model failing on one text is counted, not fatal
            if isinstance(exc, BackgroundProcessDied):
                self.child = None
            rt.counters[f"annotations.{job.kind}_failed"] += 1
            if rt.counters[f"annotations.{job.kind}_failed"] == 1:
                log.warning("%s: %s failed: %s", rt.name, job.kind, type(exc).__name__)
            return None
        finally:
            busy = time.perf_counter() - t0
            self.busy_s += busy
            await self._rest(busy)
        return self._record(job, result)

    async def _send(self, producer: AIOKafkaProducer, job: Job, value: dict[str, Any]) -> None:
        rt = self.rt
        try:
            await producer.send(
                rt.topics["annotations"],
                dumps(value),
                key=job.record.event_id.encode(),
                partition=job.partition,
            )
        except Exception as exc:  # best effort: a sample lost to a broker outage
            rt.counters[f"annotations.{job.kind}_unsent"] += 1
            log.debug("%s: %s not sent: %s", rt.name, job.kind, exc)
            return
        self.done += 1
        rt.counters[f"annotations.{job.kind}s"] += 1

    async def _rest(self, busy_s: float) -> None:
        """Wait long enough after ``busy_s`` of work to stay within ``max_busy_share`` of
        one core (the process already runs only on otherwise idle cores; this also bounds
        what it takes from an idle machine)."""
        if self.max_busy_share < 1.0:
            await asyncio.sleep(busy_s * (1.0 / self.max_busy_share - 1.0))

    def _work(self, job: Job) -> dict[str, Any] | None:
        """The job run in this process (tests): its model call and its record."""
        call = self._call(job)
        return None if call is None else self._record(job, background.run(call))

    def _call(self, job: Job) -> background.Call | None:
        """What the background process is asked to do; None when the event has no text."""
        spec, fields = self.rt.spec, job.record.fields
        if job.kind == "summary":
            summaries = spec.annotate.summaries
            assert summaries is not None
            text = fields.get(summaries.field)
            if not isinstance(text, str) or not text.strip():
                return None
            return background.Call(
                "summary",
                text,
                method=summaries.method,
                cache_dir=str(self.cache_dir),
                max_length=spec.text.max_length,
            )
        weak_spec = spec.annotate.weak_labels
        assert weak_spec is not None
        classes, field = _classes(spec, weak_spec.feature)
        text = fields.get(field)
        if not isinstance(text, str) or not text.strip():
            return None
        if job.kind == "label":
            return background.Call("label", text, classes=classes)
        flag = job.flag
        return background.Call(
            "judge",
            text,
            classes=classes,
            served=str(flag["predicted_class"]),
            weak=str(flag["weak_label"]),
        )

    def _record(self, job: Job, result: Any) -> dict[str, Any] | None:
        """The annotation record of a job's result."""
        base = {"event_id": job.record.event_id, "ts_ms": job.ts_ms}
        if job.kind == "summary":
            generated = self.rt.spec.annotate.summaries.method == "generative"  # type: ignore[union-attr]
            return {
                **base,
                "kind": "summary",
                "method": "generative" if generated else "extractive",
                "model_version": MODEL_VERSION if generated else "minilm-centroid",
                "summary": result,
            }
        if job.kind == "label":
            if result is None:
                self.rt.counters["annotations.label_unparsed"] += 1
                return None
            label, confidence = result
            return {
                **base,
                "kind": "weak_label",
                "source": "generative",
                "model_version": MODEL_VERSION,
                "label": label,
                "confidence": confidence,
            }
        return {**job.flag, "judge": result, "judge_model": MODEL_VERSION}


def _classes(spec: PipelineSpec, feature: str) -> tuple[dict[str, str], str]:
    """The zero_shot feature's classes (with their descriptions) and its text field."""
    for f in spec.text_features:
        if f.name == feature and isinstance(f, ZeroShotFeature):
            return dict(f.labels), f.field
    raise ValueError(f"{feature!r} is not a zero_shot feature")  # the spec checks this
