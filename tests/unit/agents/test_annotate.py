"""Text features, weak labels, flags and summaries in the engine's batch step, without a
broker: records in, the outbox's queue out (the real text model, no mocks of it)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord

from streamml import telemetry
from streamml.agents.annotate import Annotator, Job, sampled
from streamml.agents.engine import PipelineEngine
from streamml.agents.runtime import Held, PartitionState, PipelineRuntime
from streamml.config import load_settings
from streamml.errors import BackgroundProcessDied
from streamml.models import background
from streamml.models.features import GlobalState
from streamml.models.online import OnlineLearner
from streamml.schemas.spec import PipelineSpec, parse_spec
from streamml.streams.outbox import Outbox

TEXTS = [
    "I was charged twice for my subscription this month. Please refund the second charge.",
    "The app crashes every time I open the settings page. It started after the update.",
    "I forgot my password and the reset email never arrives.",
    "My package has not arrived and the tracking page has not changed for a week.",
    "Please add a dark mode to the app. It would help a lot at night.",
    "The invoice shows the wrong amount for last month.",
]
TRUTH = ["billing", "technical", "account", "billing", "technical", "billing"]


def _spec(summary_sample: float = 0.0) -> PipelineSpec:
    return parse_spec(
        {
            "name": "tx",
            "task": "classification",
            "schema": {"fields": {"body": {"type": "string", "max_length": 500}}},
            "label": {"field": "y", "classes": ["billing", "technical", "account"]},
            "features": [
                {"name": "vec", "kind": "embedding", "field": "body", "dims": 8},
                {
                    "name": "topic",
                    "kind": "zero_shot",
                    "field": "body",
                    "labels": {
                        "billing": "a charge, a refund, an invoice or a payment",
                        "technical": "the app or device is broken, crashes or shows an error",
                        "account": "cannot sign in, password, login or account access",
                    },
                },
                {"name": "words", "kind": "tfidf", "field": "body", "buckets": 16},
            ],
            "online_model": {"kind": "softmax_regression"},
            "annotate": {
                "weak_labels": {"feature": "topic"},
                "flags": {"min_confidence": 0.0},
                "summaries": {"field": "body", "sample": summary_sample, "queue": 2},
            },
        }
    )


def _message(topic: str, offset: int, value: dict[str, Any]) -> ConsumerRecord[bytes, bytes]:
    data = orjson.dumps(value)
    return ConsumerRecord(topic, 0, offset, 1_000 + offset, 0, b"k", data, None, 1, len(data), [])


def _engine(tmp_path: Path, spec: PipelineSpec) -> tuple[PipelineEngine, PartitionState]:
    settings = load_settings(state_dir=tmp_path)  # the shared cache dir: the exported model
    rt = PipelineRuntime.from_spec(spec, "app", 1, telemetry.setup(settings), settings)
    state = PartitionState(0, OnlineLearner(spec), GlobalState())
    rt.states[0] = state
    return PipelineEngine(settings, rt), state


def _run(engine: PipelineEngine, state: PartitionState, texts: list[str]) -> dict[str, list[Any]]:
    """Events e<i> with these texts, each followed by its label; the outbox by role."""
    rt = engine.rt
    raw, labels = rt.topics["raw"], rt.topics["labels"]
    ready = []
    for i, text in enumerate(texts):
        ready.append(_message(raw, i, {"event_id": f"e{i}", "body": text}))
        ready.append(_message(labels, i, {"event_id": f"e{i}", "y": TRUTH[i % len(TRUTH)]}))
    held = [
        Held((m.timestamp, n, 0, m.offset), m.topic == labels, m, 0.0) for n, m in enumerate(ready)
    ]
    asyncio.run(_prefetch(engine, [h.message for h in held if not h.is_label]))
    out = Outbox(object())  # type: ignore[arg-type]  # nothing is sent here
    engine._apply(state, held, out, Counter(), {"ingest": 0.0, "score": 0.0, "learn": 0.0})
    by_role: dict[str, list[Any]] = {}
    roles = {topic: role for role, topic in rt.topics.items()}
    for (topic, _), records in out._records.items():
        for _, value, _ in records:
            by_role.setdefault(roles.get(topic, topic), []).append(
                orjson.loads(value) if value and value[:1] == b"{" else value
            )
    return by_role


async def _prefetch(engine: PipelineEngine, messages: list[Any]) -> None:
    from streamml.agents.annotate import prefetch

    await prefetch(engine.rt, messages)


def test_texts_become_features_weak_labels_and_a_scored_labeller(tmp_path: Path) -> None:
    engine, state = _engine(tmp_path, _spec())
    sent = _run(engine, state, TEXTS)
    [features, *_] = sent["features"]
    keys = set(features["features"])
    assert {f"vec_{i}" for i in range(8)} <= keys
    assert {"topic=billing", "topic=technical", "topic=account"} <= keys
    assert sum(k.startswith("topic#top=") for k in keys) == 1
    assert any(k.startswith("words#") for k in keys)
    notes = sent["annotations"]
    weak = {n["event_id"]: n for n in notes if n["kind"] == "weak_label"}
    assert set(weak) == {f"e{i}" for i in range(len(TEXTS))}
    assert [weak[f"e{i}"]["label"] for i in range(3)] == ["billing", "technical", "account"]
    assert all(n["source"] == "zero_shot:topic" and 0 < n["confidence"] <= 1 for n in weak.values())
    # the labeller is scored like a model when the labels come: its own minute metrics
    window = state.minutes[("zero_shot:topic", "labeller")]
    assert window.n == len(TEXTS)
    right = sum(weak[f"e{i}"]["label"] == TRUTH[i] for i in range(len(TEXTS)))
    assert window.metrics["accuracy"].get() == pytest.approx(right / len(TEXTS))
    # the text model ran once per distinct text: the prefetch, then cache hits
    embedder = engine.rt.text.embedder  # type: ignore[union-attr]
    assert embedder.hits >= len(TEXTS)


def test_flags_are_confident_disagreements_between_served_and_weak(tmp_path: Path) -> None:
    engine, state = _engine(tmp_path, _spec())
    sent = _run(engine, state, TEXTS)
    served = {p["event_id"]: p for p in sent["predictions"] if p["served"]}
    weak = {n["event_id"]: n for n in sent["annotations"] if n["kind"] == "weak_label"}
    flags = {n["event_id"]: n for n in sent["annotations"] if n["kind"] == "flag"}
    for event_id, p in served.items():
        differs = bool(p["predicted_class"]) and p["predicted_class"] != weak[event_id]["label"]
        assert (event_id in flags) == differs, (p, weak[event_id])


def test_a_text_step_failing_on_one_record_makes_one_dead_letter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, state = _engine(tmp_path, _spec())
    text = engine.rt.text
    assert text is not None
    real = text.transform_many

    def transform_many(records: Any, stats: Any) -> Any:
        if any(r.fields["body"] == TEXTS[1] for r in records):
            raise RuntimeError("boom")
        return real(records, stats)

    monkeypatch.setattr(text, "transform_many", transform_many)
    sent = _run(engine, state, TEXTS)
    [letter] = sent["dlq"]
    assert letter["error_class"] == "text_failed" and "boom" in letter["reason"]
    served = {p["event_id"] for p in sent["predictions"]}
    assert served == {f"e{i}" for i in range(len(TEXTS)) if i != 1}


def test_summaries_never_run_in_the_scoring_step_and_a_full_queue_drops(tmp_path: Path) -> None:
    engine, state = _engine(tmp_path, _spec(summary_sample=1.0))
    rt = engine.rt
    rt.annotator = Annotator(rt, 2)  # its task is not running: nothing is summarised
    sent = _run(engine, state, TEXTS)
    assert not any(n["kind"] == "summary" for n in sent["annotations"])
    assert rt.annotator.queue.qsize() == 2
    assert rt.counters["annotations.summary_dropped"] == len(TEXTS) - 2
    assert len(sent["predictions"]) == len(TEXTS)  # every event served all the same


def test_the_annotator_summarises_in_a_low_priority_process_of_its_own(tmp_path: Path) -> None:
    """The summary is made in a spawned child at SCHED_IDLE (nice 19 where refused): no
    lock or core it needs is one the scoring needs."""
    engine, _ = _engine(tmp_path, _spec(summary_sample=1.0))
    rt = engine.rt
    sent: list[tuple[str, bytes, int]] = []
    where: list[tuple[int, str, int]] = []

    class Producer:
        async def send(self, topic: str, value: bytes, key: bytes, partition: int) -> None:
            sent.append((topic, value, partition))

    async def go() -> None:
        annotator = Annotator(rt, 10)
        from streamml.schemas.records import Record

        record = Record("e0", 1_000, None, {"body": TEXTS[0]})
        annotator.offer(Job("summary", 0, 1_000, record, {}))
        task = asyncio.create_task(annotator.run(Producer()))  # type: ignore[arg-type]
        for _ in range(1200):
            if sent:
                break
            await asyncio.sleep(0.05)
        where.append(await annotator.process.call(background.priority))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert annotator.process._pool is None  # closed with its task

    asyncio.run(go())
    [(topic, value, partition)] = sent
    summary = orjson.loads(value)
    assert topic == rt.topics["annotations"] and partition == 0
    assert summary["kind"] == "summary" and summary["method"] == "extractive"
    assert summary["summary"] in TEXTS[0] and summary["event_id"] == "e0"
    [(pid, policy, niceness)] = where
    assert pid != os.getpid()
    assert policy == background.IDLE if sys.platform == "linux" else niceness == 19


def test_a_dead_background_process_fails_one_job_and_the_next_starts_a_new_one() -> None:
    process = background.LowPriorityProcess()

    async def go() -> tuple[int, int]:
        try:
            first, _, _ = await process.call(background.priority)
            with pytest.raises(BackgroundProcessDied):
                await process.call(os._exit, 3)  # the child dies mid-job
            second, _, _ = await process.call(background.priority)
            return first, second
        finally:
            process.close()

    first, second = asyncio.run(go())
    assert first != second and process.restarts == 1


def test_sampling_is_by_event_id() -> None:
    picked = [sampled(f"e{i}", 0.3, "summary") for i in range(5000)]
    assert 0.27 < sum(picked) / 5000 < 0.33
    assert picked == [sampled(f"e{i}", 0.3, "summary") for i in range(5000)]


def test_a_new_topic_after_the_warm_up_opens_a_cluster_reported_as_data_drift(
    tmp_path: Path,
) -> None:
    spec = parse_spec(
        {
            "name": "tc",
            "task": "classification",
            "schema": {"fields": {"body": {"type": "string"}}},
            "label": {"field": "y", "classes": ["billing", "technical", "account"]},
            "features": [
                {
                    "name": "topic",
                    "kind": "cluster",
                    "field": "body",
                    "threshold": 0.3,
                    "min_events": len(TEXTS) * 2,
                }
            ],
            "online_model": {"kind": "softmax_regression"},
        }
    )
    engine, state = _engine(tmp_path, spec)
    _run(engine, state, TEXTS * 2)  # the warm-up: support tickets
    assert state.detections == []
    cooking = [
        "Simmer the tomatoes with garlic and basil for twenty minutes.",
        "Knead the dough, let it rise for an hour, then bake it at 220 degrees.",
    ]
    _run(engine, state, cooking)
    [(detection, ts_ms, _)] = state.detections[:1]
    assert (detection.detector, detection.kind) == ("new_cluster", "data")
    assert detection.target.startswith("topic#") and ts_ms >= 1_000
    assert engine.rt.counters["text.new_clusters"] >= 1


def test_the_generative_model_labels_and_judges_off_the_hot_path(tmp_path: Path) -> None:
    """The background jobs for generative weak labels and the judge (the real small model)."""
    from streamml.models import generative
    from streamml.schemas.records import Record

    engine, _ = _engine(tmp_path, _spec())
    annotator = Annotator(engine.rt, 10)
    record = Record("e0", 1_000, "", {"body": TEXTS[0]})
    label = annotator._work(Job("label", 0, 1_000, record, {}))
    if label is not None:  # the model may put too little mass on every class: no label
        assert label["kind"] == "weak_label" and label["source"] == "generative"
        assert label["label"] in ("billing", "technical", "account")
        assert 0 < label["confidence"] <= 1 and label["model_version"] == generative.MODEL_VERSION
    flag = {
        "kind": "flag",
        "event_id": "e0",
        "predicted_class": "technical",
        "weak_label": "billing",
    }
    judged = annotator._work(Job("judge", 0, 1_000, record, flag))
    assert judged is not None and judged["judge"] in ("served", "weak", "neither")
    assert judged["judge_model"] == generative.MODEL_VERSION and judged["event_id"] == "e0"


def test_the_annotator_keeps_within_its_share_of_a_core(tmp_path: Path) -> None:
    """After each job it rests long enough that its work is at most max_busy_share of the
    time; the queue, not the scoring, absorbs it."""
    import time

    from streamml.schemas.records import Record

    engine, _ = _engine(tmp_path, _spec(summary_sample=1.0))
    starts: list[float] = []

    class Producer:
        async def send(self, *args: Any, **kwargs: Any) -> None:
            pass

    class Process:  # stands for the background process: each job takes 0.05 s
        restarts = 0

        async def call(self, fn: Any, *args: Any) -> Any:
            if fn is background.priority:
                return (1, background.IDLE, 0)
            starts.append(time.monotonic())
            await asyncio.sleep(0.05)
            return "a summary"

        def close(self) -> None:
            pass

    async def go() -> None:
        annotator = Annotator(engine.rt, 10, max_busy_share=0.25, process=Process())  # type: ignore[arg-type]
        for i in range(3):
            record = Record(f"e{i}", 1_000, "", {"body": TEXTS[i]})
            annotator.offer(Job("summary", 0, 1_000, record, {}))
        task = asyncio.create_task(annotator.run(Producer()))  # type: ignore[arg-type]
        for _ in range(100):
            if len(starts) == 3:
                break
            await asyncio.sleep(0.02)
        task.cancel()

    asyncio.run(go())
    assert len(starts) == 3
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g >= 0.05 * 4 * 0.95 for g in gaps), gaps  # work 0.05 s + rest 3 x 0.05 s


def test_a_batch_embedding_failure_falls_back_to_one_dead_letter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch call in prefetch raises (one bad text): the worker goes on, the text step
    embeds record by record and only that record is a dead letter."""
    engine, state = _engine(tmp_path, _spec())
    text = engine.rt.text
    assert text is not None
    real = text.embedder.encoder.encode

    def encode(texts: Any) -> Any:
        if TEXTS[2] in texts:
            raise RuntimeError("boom")
        return real(texts)

    monkeypatch.setattr(text.embedder.encoder, "encode", encode)
    sent = _run(engine, state, TEXTS)  # prefetch raises inside: caught and counted
    assert engine.rt.counters["text.prefetch_failed"] == 1
    [letter] = sent["dlq"]
    assert letter["error_class"] == "text_failed" and "boom" in letter["reason"]
    assert {p["event_id"] for p in sent["predictions"]} == {
        f"e{i}" for i in range(len(TEXTS)) if i != 2
    }
