"""Text features in the engine against raw onnxruntime, weak labels, and live latency.

    ~/.cache/streamml/venv/bin/python bench/text.py [--events 1500] [--batch 256] [--no-live]

The shipped ``tickets`` spec (MiniLM int8 on onnxruntime's CPU provider, the spec's
threads) on synthetic tickets (``streamml.models.tickets``, seed 11: the zero-shot label
descriptions were tuned on seed 7), validated by the spec, cut into engine batches of
``--batch`` records (each record's partition: crc32 of its key).

* raw: tokenize + ``session.run`` on exactly the texts the engine's encoder got for each
  batch (the engine embeds each distinct text once; the raw replays those calls).
* in engine: per batch what ``PipelineEngine._process/_apply`` run for text: ``prefetch``
  (parse the raw records, embed their texts in one call in a thread), then ``text_step``
  per partition (``TextFeaturizer.transform_many``: projection, zero-shot, tf-idf,
  clusters, selection, merge), with an EMPTY embedding cache and fresh partition state
  each pass. Validation and the other features are left out of both.
* raw, length-sorted: the same texts sorted by token count and run in chunks of
  ``--chunk``, each cut to its longest text (what the encoder would gain without padding).

The three arms alternate batch by batch (so a change of load hits them alike), over
``--repeats`` passes after a short warm-up; medians are printed, with the ratio's range.
The same again on ``--small-batch`` records per batch (a live worker's batches at tens of
events/s). Then the text step with a warm cache (every text seen: no model call) and its
cost by feature, and the zero-shot weak labels' accuracy against the true labels.

Live (``--no-live`` skips it; ``--live-only --rate R`` runs only it): a broker and two
workers, one per variant of the spec (summaries off / on at ``--summary-sample``, 1.0 by
default, extractive; the online model serving, no batch model), fed the same rate in
alternating segments (``--live-repeats`` of ``--live-seconds`` each) after a warm-up;
event (producer timestamp) -> served prediction emitted, from ClickHouse
``e2e_latency_ms``. The rate defaults to 0.2 of the in-engine events/s measured just
before (at least 40/s). After a summaries-on segment the bench waits for the annotator to
finish its queue, so it never runs into the next. Besides each variant's per-segment
p99s it prints the p99 of all a variant's events pooled, their ratio with a 90% interval
from resampling whole segments, and the same ratio for the off variant's odd segments
against its even ones: what the bench reads as a difference when there is none.
Prints ``key=value`` lines; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from streamml import telemetry
from streamml.agents.annotate import prefetch, text_step
from streamml.agents.runtime import PartitionState, PipelineRuntime
from streamml.agents.score import Scored
from streamml.config import Settings
from streamml.models.embeddings import DIM, Embedder, OnnxEncoder, _batch, _tokenizer, load_encoder
from streamml.models.features import GlobalState
from streamml.models.online import OnlineLearner
from streamml.models.text import TextFeaturizer
from streamml.models.tickets import tickets
from streamml.schemas.catalog import load_pipelines
from streamml.schemas.records import Record, Source, validate
from streamml.streams.topics import dumps

ROOT = Path(__file__).resolve().parents[1]
SEED = 11


def progress(msg: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# --- in process -----------------------------------------------------------------------
@dataclass
class _Message:
    """The fields of a ConsumerRecord the text steps read."""

    partition: int
    offset: int
    key: bytes
    value: bytes
    topic: str = "tickets.raw"
    timestamp: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()


class _NullOutbox:
    def add(self, *args: object, **kwargs: object) -> None:
        pass


class _Recorder:
    """A stand-in encoder that keeps the texts of each call, per batch, and returns unit
    rows without running the model: the texts the engine embeds depend on the cache and
    the de-duplication alone, so the raw pass can replay them."""

    dim, device = DIM, "cpu"

    def __init__(self) -> None:
        self.batch = 0
        self.calls: dict[int, list[list[str]]] = {}

    def encode(self, texts: Sequence[str]) -> Any:
        self.calls.setdefault(self.batch, []).append(list(texts))
        rows = np.random.default_rng(len(texts)).normal(size=(len(texts), DIM))
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


Batch = list[tuple[_Message, Record]]


@dataclass
class Pass:
    seconds: float = 0.0
    prefetch_s: float = 0.0  # engine: parse + embed the batch's texts
    encode_s: float = 0.0  # engine: inside the encoder (tokenize + session.run)
    step_s: float = 0.0  # engine: text_step of every partition
    tokenize_s: float = 0.0  # raw
    weak: dict[str, tuple[str, float] | None] = field(default_factory=dict)


def _work(rt: PipelineRuntime, batches: list[Batch]) -> list[tuple[list[Any], dict[int, Any]]]:
    """Each batch's messages and, per partition, its items (mutated by a pass: fresh ones)."""
    work = []
    for batch in batches:
        by_part: dict[int, dict[int, Scored]] = {p: {} for p in range(rt.partitions)}
        for i, (m, r) in enumerate(batch):
            by_part[m.partition][i] = Scored(m, r, {}, (), "")  # type: ignore[arg-type]
        work.append(([m for m, _ in batch], by_part))
    return work


_PADDED: list[Any] = []


def padded() -> Any:
    """The tokenizer padding a batch to its longest text (the plain way to call the model;
    the engine's encoder sorts by length and pads per chunk instead)."""
    if not _PADDED:
        _PADDED.append(_tokenizer(128))
    return _PADDED[0]


def raw_call(encoder: OnnxEncoder, texts: list[str], res: Pass) -> None:
    """The plain call: tokenize (padded to the longest), one run."""
    t0 = time.perf_counter()
    inputs = _batch(padded(), texts)
    t1 = time.perf_counter()
    encoder.session.run(None, inputs)
    res.tokenize_s += t1 - t0
    res.seconds += time.perf_counter() - t0


def sorted_call(encoder: OnnxEncoder, texts: list[str], res: Pass, chunk: int) -> Any:
    """The same texts sorted by token count and run in chunks of ``chunk``, each cut to
    its own longest text: the padding a batch of mixed lengths otherwise computes on."""
    t0 = time.perf_counter()
    inputs = _batch(padded(), texts)
    lengths = inputs["attention_mask"].sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    out = np.empty((len(texts), DIM), dtype=np.float32)
    for i in range(0, len(order), chunk):
        idx = order[i : i + chunk]
        width = int(lengths[idx].max())
        part = {k: v[idx, :width] for k, v in inputs.items()}
        out[idx] = encoder.session.run(None, part)[0]
    res.seconds += time.perf_counter() - t0
    return out


def paired_pass(
    rt: PipelineRuntime,
    batches: list[Batch],
    embedder: Embedder,
    calls: dict[int, list[list[str]]] | None = None,
    encoder: OnnxEncoder | None = None,
    rotate: int = 0,
    chunk: int = 32,
) -> tuple[Pass, Pass, Pass]:
    """Batch by batch: the engine's text work (prefetch, then text_step per partition),
    the raw onnxruntime call on the same texts, and the raw call on length-sorted chunks;
    in an order that rotates from batch to batch, so a change of load on the machine hits
    all three alike. ``calls`` None: the engine alone."""
    assert rt.text is not None
    rt.text._embedder = embedder
    parts = rt.partitions
    states = {p: PartitionState(p, OnlineLearner(rt.spec), GlobalState()) for p in range(parts)}
    work, out = _work(rt, batches), _NullOutbox()
    eng, raw, srt = Pass(), Pass(), Pass()

    async def engine(b: int) -> None:
        messages, by_part = work[b]
        e0, t0 = embedder.encode_s, time.perf_counter()
        await prefetch(rt, messages)
        t1 = time.perf_counter()
        for p, items in by_part.items():
            text_step(rt, states[p], items, out)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        eng.prefetch_s += t1 - t0
        eng.step_s += t2 - t1
        eng.seconds += t2 - t0
        eng.encode_s += embedder.encode_s - e0

    async def run() -> None:
        for b in range(len(work)):
            if isinstance(embedder.encoder, _Recorder):
                embedder.encoder.batch = b
            if calls is None or encoder is None:
                await engine(b)
                continue
            arms = ["engine", "raw", "sorted"]
            k = (b + rotate) % 3
            for arm in arms[k:] + arms[:k]:
                if arm == "engine":
                    await engine(b)
                for texts in calls.get(b, []):
                    if arm == "raw":
                        raw_call(encoder, texts, raw)
                    elif arm == "sorted":
                        sorted_call(encoder, texts, srt, chunk)

    asyncio.run(run())
    for _, by_part in work:
        for items in by_part.values():
            for it in items.values():
                eng.weak[it.record.event_id] = it.weak
    return eng, raw, srt


def by_feature_us(
    rt: PipelineRuntime, batches: list[Batch], embedder: Embedder
) -> dict[str, float]:
    """µs per event of each text feature alone, per partition as the engine calls it,
    with every text in the cache (no model call): the median of 3 passes."""
    assert rt.text is not None
    out: dict[str, float] = {}
    n = sum(len(b) for b in batches)
    split = [
        [[r for m, r in batch if m.partition == p] for p in range(rt.partitions)]
        for batch in batches
    ]
    for f in rt.spec.text_features:
        spec = rt.spec.model_copy(update={"features": [f]})
        tf = TextFeaturizer(spec, rt.text.cache_dir, embedder=embedder)
        tf.warm()
        times = []
        for _ in range(3):
            stats = [GlobalState() for _ in range(rt.partitions)]
            t0 = time.perf_counter()
            for parts in split:
                for p, records in enumerate(parts):
                    tf.transform_many(records, stats[p])
            times.append(time.perf_counter() - t0)
        out[f.name] = statistics.median(times) / n * 1e6
    return out


@dataclass
class Measured:
    events: int
    batches: list[Batch]
    embedded: int  # texts the encoder got (each distinct text once: the raw's too)
    raws: list[Pass]
    engines: list[Pass]
    sorts: list[Pass]
    embedder: Embedder  # the last pass's: every text of the stream in its cache


def measure(
    rt: PipelineRuntime,
    encoder: OnnxEncoder,
    records: Batch,
    batch: int,
    repeats: int,
    chunk: int,
) -> Measured:
    size = rt.spec.text.cache_size
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]
    recorder = _Recorder()  # which texts the engine embeds, batch by batch
    paired_pass(rt, batches, Embedder(recorder, size=size))  # type: ignore[arg-type]
    calls = recorder.calls
    embedded = sum(len(c) for cs in calls.values() for c in cs)
    paired_pass(rt, batches[:2], Embedder(encoder, size=size), calls, encoder)  # warm-up
    m = Measured(len(records), batches, embedded, [], [], [], Embedder(encoder, size=size))
    for r in range(repeats):
        m.embedder = Embedder(encoder, size=size)  # empty: each pass embeds what the first did
        eng, raw, srt = paired_pass(rt, batches, m.embedder, calls, encoder, r, chunk)
        assert m.embedder.misses == embedded, (m.embedder.misses, embedded)  # the same texts
        m.engines.append(eng)
        m.raws.append(raw)
        m.sorts.append(srt)
        progress(
            f"batch {batch}, repeat {r + 1}/{repeats}: raw {raw.seconds:.1f} s, engine "
            f"{eng.seconds:.1f} s, raw sorted {srt.seconds:.1f} s; load {load()}"
        )
    return m


def report(m: Measured, suffix: str) -> None:
    med = statistics.median
    n, embedded = m.events, m.embedded
    raw_s, eng_s = med(p.seconds for p in m.raws), med(p.seconds for p in m.engines)
    ratios = [ra.seconds / en.seconds for ra, en in zip(m.raws, m.engines, strict=True)]
    print(f"texts_embedded{suffix}={embedded} events{suffix}={n} batches{suffix}={len(m.batches)}")
    print(f"raw_onnxruntime_embeddings_per_s{suffix}={embedded / raw_s:.1f}")
    print(f"in_engine_embeddings_per_s{suffix}={embedded / eng_s:.1f}")
    print(f"ratio_in_engine_over_raw_embeddings{suffix}={med(ratios):.3f}")
    print(f"ratio_in_engine_over_raw_embeddings_range{suffix}={min(ratios):.3f}-{max(ratios):.3f}")
    e = sorted(m.engines, key=lambda p: p.seconds)[len(m.engines) // 2]  # the median pass
    tok = med(p.tokenize_s for p in m.raws)
    print(f"raw_us_per_text_tokenize{suffix}={tok / embedded * 1e6:.0f}")
    print(f"raw_us_per_text_session_run{suffix}={(raw_s - tok) / embedded * 1e6:.0f}")
    print(f"in_engine_us_per_text_encode{suffix}={e.encode_s / embedded * 1e6:.0f}")
    other = (e.prefetch_s - e.encode_s) / n * 1e6
    print(f"in_engine_us_per_event_prefetch_other{suffix}={other:.0f}")
    print(f"in_engine_us_per_event_text_step{suffix}={e.step_s / n * 1e6:.0f}")
    srt_s = med(p.seconds for p in m.sorts)
    print(f"raw_length_sorted_chunks_embeddings_per_s{suffix}={embedded / srt_s:.1f}")
    print(f"ratio_raw_length_sorted_over_raw{suffix}={raw_s / srt_s:.2f}")


def in_process(args: argparse.Namespace, tmp: Path) -> float:
    """Prints the in-process figures; returns the engine's embeddings/s (median)."""
    [spec] = load_pipelines(ROOT / "pipelines", ["tickets"])
    tmp.mkdir(parents=True, exist_ok=True)
    settings = Settings(state_dir=tmp)
    rt = PipelineRuntime.from_spec(spec, "bench", 1, telemetry.setup(settings), settings)
    assert rt.text is not None
    t = spec.text
    encoder = load_encoder(
        settings.cache_dir, device="cpu", max_length=t.max_length, threads=t.threads
    )
    assert isinstance(encoder, OnnxEncoder)
    rt.text._embedder = Embedder(encoder, size=t.cache_size)
    rt.text.warm()  # label descriptions embedded once, as at worker start

    examples = list(tickets(args.events, seed=SEED))
    records: Batch = []
    for i, ex in enumerate(examples):
        payload = dumps(ex.record)
        part = zlib.crc32(ex.key.encode()) % rt.partitions
        record = validate(spec, payload, Source("tickets.raw", part, i, 0, None))
        assert isinstance(record, Record), record
        records.append((_Message(part, i, ex.key.encode(), payload), record))
    bodies = [str(ex.record["body"]) for ex in examples]  # type: ignore[index]
    print(f"encoder=minilm-int8-onnxruntime-cpu threads={t.threads} max_length={t.max_length}")
    print(f"events={len(records)} distinct_bodies={len(set(bodies))} repeats={args.repeats}")
    progress(f"{len(records)} tickets, batches of {args.batch}; load {load()}")

    # int8 with dynamic quantization scales activations per call: a text's embedding
    # depends a little on the batch it is in (padding included), so the sorted chunks are
    # compared by cosine, beside each text embedded alone
    texts = bodies[: args.batch]
    whole = encoder.encode(texts)
    chunks = sorted_call(encoder, texts, Pass(), args.chunk)
    alone = np.concatenate([encoder.encode([x]) for x in texts[:32]])
    print(f"batch={args.batch} sorted_chunk={args.chunk}")
    print(f"cosine_min_sorted_chunks_vs_batch={float((whole * chunks).sum(1).min()):.4f}")
    print(f"cosine_min_alone_vs_batch={float((whole[:32] * alone).sum(1).min()):.4f}")
    main = measure(rt, encoder, records, args.batch, args.repeats, args.chunk)
    report(main, "")
    n = len(records)
    cached = [paired_pass(rt, main.batches, main.embedder)[0] for _ in range(3)]
    warm_s = statistics.median(p.seconds for p in cached)
    print(f"in_engine_warm_cache_events_per_s={n / warm_s:.0f}")
    print(f"in_engine_warm_cache_us_per_event={warm_s / n * 1e6:.0f}")
    for name, us in by_feature_us(rt, main.batches, main.embedder).items():
        print(f"text_step_us_per_event_{name}={us:.0f}")

    # zero-shot argmax (the weak label of every event) against the true labels
    weak, half = main.engines[0].weak, len(examples) // 2
    judged = []  # (right, confidence, after the drift)
    for i, ex in enumerate(examples):
        w = weak[str(ex.record["event_id"])]  # type: ignore[index]
        if ex.label is not None and w is not None:
            judged.append((w[0] == ex.label, w[1], i >= half))
    right = [ok for ok, _, _ in judged]
    sure = [ok for ok, c, _ in judged if c >= 0.7]
    early = [ok for ok, _, late in judged if not late]
    late = [ok for ok, _, late in judged if late]
    print(f"weak_label_accuracy={sum(right) / len(right):.3f} labelled={len(right)}")
    print(f"weak_label_accuracy_before_drift={sum(early) / len(early):.3f}")
    print(f"weak_label_accuracy_after_drift={sum(late) / len(late):.3f}")
    print(
        f"weak_label_accuracy_confidence_ge_0.7={sum(sure) / max(len(sure), 1):.3f} "
        f"share={len(sure) / len(right):.3f}"
    )

    if args.small_batch:  # batches as small as a live worker's at tens of events/s
        small = records[: args.small_events]
        report(
            measure(rt, encoder, small, args.small_batch, args.repeats, args.chunk),
            f"_batch{args.small_batch}",
        )
    return main.embedded / statistics.median(p.seconds for p in main.engines)


# --- live -------------------------------------------------------------------------------
def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


def pooled_p99_ratio(
    on: list[list[float]], off: list[list[float]], resamples: int = 2000, seed: int = 5
) -> tuple[float, float, float]:
    """p99 of all ``on`` segments' latencies over that of all ``off`` ones, and a 90%
    interval from resampling whole segments (a segment's hiccups hit many of its events
    at once, so events are not independent; segments are)."""
    rng = np.random.default_rng(seed)

    def p99(segments: list[list[float]]) -> float:
        return float(np.quantile(np.concatenate(segments), 0.99))

    ratios = [
        p99([on[i] for i in rng.integers(0, len(on), len(on))])
        / p99([off[i] for i in rng.integers(0, len(off), len(off))])
        for _ in range(resamples)
    ]
    lo, hi = np.quantile(ratios, [0.05, 0.95])
    return p99(on) / p99(off), float(lo), float(hi)


def _spec_variant(summaries: bool, sample: float, busy_share: float | None) -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / "pipelines" / "tickets.yaml").read_text())
    spec["name"] = "benchtext_on" if summaries else "benchtext_off"
    spec.pop("batch_model", None)  # the online model serves: this is about text, not training
    spec["serving"] = {"champion": "online"}
    spec["retrain"] = {"on_drift": False}
    spec["alerts"] = {"rules": []}
    spec.get("drift", {}).pop("data", None)
    if summaries:
        spec["annotate"]["summaries"].update(sample=sample, method="extractive")
        if busy_share is not None:
            spec["annotate"]["max_busy_share"] = busy_share
    else:
        spec["annotate"].pop("summaries")
    return spec


def _summaries_settled(worker: Any, name: str) -> tuple[int, int]:
    counters = worker.get("/stats")["pipelines"][name]["counters"]
    done = int(counters.get("annotations.summarys", 0))
    lost = sum(int(counters.get(f"annotations.summary_{k}", 0)) for k in ("dropped", "failed"))
    return done, lost


def live(args: argparse.Namespace, rate: float, tmp: Path) -> None:
    from streamml.agents.annotate import sampled
    from streamml.devstack import LocalBroker
    from streamml.devstack.worker import WorkerProcess
    from streamml.streams.kafka import ensure_pipeline_topics
    from streamml.streams.producer import produce_examples
    from streamml.testing import free_port, isolated_settings

    settings = isolated_settings(tmp)
    broker = LocalBroker(settings)
    folder = tmp / "pipelines"
    folder.mkdir(parents=True)
    names = ["benchtext_off", "benchtext_on"]
    for name, on in zip(names, (False, True), strict=True):
        variant = _spec_variant(on, args.summary_sample, args.max_busy_share)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(variant))
    settings = settings.model_copy(
        update={
            "pipelines_dir": folder,
            "kafka_bootstrap": settings.bootstrap_servers,
            "trainer_enabled": False,
        }
    )
    specs = dict(zip(names, load_pipelines(folder, names), strict=True))
    workers: dict[str, WorkerProcess] = {}
    try:
        broker.up()
        asyncio.run(ensure_pipeline_topics(settings, list(specs.values())))
        for name in names:
            ws = settings.model_copy(
                update={"state_dir": tmp / name, "web_port": free_port(), "app_id": name}
            )
            workers[name] = WorkerProcess(ws, [name], tmp / f"{name}.log")
        failures: list[BaseException] = []

        def start(w: WorkerProcess) -> None:  # both at once: each loads the text model
            try:
                w.start(timeout_s=240)
            except BaseException as exc:
                failures.append(exc)

        starts = [threading.Thread(target=start, args=(w,)) for w in workers.values()]
        for th in starts:
            th.start()
        for th in starts:
            th.join()
        if failures:
            raise failures[0]
        progress(f"workers ready; load {load()}")
        n = int(rate * args.live_seconds)
        produced = dict.fromkeys(names, 0)

        def segment(name: str, seed: int, count: int) -> tuple[list[float], float]:
            worker, spec = workers[name], specs[name]
            start = dt.datetime.now(dt.UTC)
            examples = list(tickets(count, seed=seed, start=start, span_s=count / rate))
            asyncio.run(
                produce_examples(worker.settings, spec, examples, rate=rate, label_delay=50)
            )
            produced[name] += sum(  # the events the annotator samples for a summary
                1
                for e in examples
                if isinstance(e.record, dict)
                and sampled(str(e.record["event_id"]), args.summary_sample, "summary")
            )
            where = (
                f"FROM predictions FINAL WHERE pipeline = '{name}' AND served = 1 "
                f"AND startsWith(event_id, 'tkt-{seed}-')"
            )
            deadline = time.monotonic() + 300
            while int(worker.query(f"SELECT count() {where}")[1][0][0]) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: predictions missing\n{worker.log_tail()}")
                time.sleep(0.2)
            lat = [  # in event time order: where in a segment the slow events are
                float(r[0]) for r in worker.query(f"SELECT e2e_latency_ms {where} ORDER BY ts")[1]
            ]
            t0, drain = time.monotonic(), 0.0
            if name.endswith("_on"):  # let the annotator finish before the next segment
                while sum(_summaries_settled(worker, name)) < produced[name]:
                    if time.monotonic() - t0 > 180:
                        break
                    time.sleep(0.5)
                drain = time.monotonic() - t0
            return lat, drain

        for name in names:  # warm-up: first batches, assignment, lazy imports
            segment(name, 900 + names.index(name), int(rate * 3))
        p50: dict[str, list[float]] = {k: [] for k in names}
        p99: dict[str, list[float]] = {k: [] for k in names}
        drains: list[float] = []
        segments: dict[str, list[list[float]]] = {k: [] for k in names}
        for r in range(args.live_repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                lat, drain = segment(name, 1000 + 10 * r + names.index(name), n)
                segments[name].append(lat)
                p50[name].append(quantile(lat, 0.5))
                p99[name].append(quantile(lat, 0.99))
                if drain:
                    drains.append(drain)
                progress(
                    f"live {r + 1}/{args.live_repeats} {name}: p50 {p50[name][-1]:.0f} "
                    f"p99 {p99[name][-1]:.0f} ms; load {load()}"
                )
        done, lost = _summaries_settled(workers["benchtext_on"], "benchtext_on")
        encode_ms = {}  # the worker's own prefetch time per text: where its batches went
        for name, w in workers.items():
            c = w.get("/stats")["pipelines"][name]["counters"]
            encode_ms[name] = c.get("text.prefetch_ms", 0) / max(c.get("text.prefetched", 0), 1)
    finally:
        for w in workers.values():
            w.stop()
        broker.down()
    med = statistics.median
    off, on = p99["benchtext_off"], p99["benchtext_on"]
    print(f"live_rate_eps={rate:.0f} live_events_per_segment={n} live_repeats={args.live_repeats}")
    for name, tag in zip(names, ("summaries_off", "summaries_on"), strict=True):
        print(f"e2e_p50_ms_{tag}={med(p50[name]):.1f}")
        print(f"e2e_p99_ms_{tag}={med(p99[name]):.1f}")
        print(f"e2e_p99_ms_{tag}_repeats={','.join(f'{v:.0f}' for v in p99[name])}")
    print(f"ratio_p99_summaries_on_over_off={med(on) / med(off):.2f}")
    pairs = [a / b for a, b in zip(on, off, strict=True)]
    print(f"ratio_p99_summaries_on_over_off_per_repeat={','.join(f'{v:.2f}' for v in pairs)}")
    ratio, lo, hi = pooled_p99_ratio(segments["benchtext_on"], segments["benchtext_off"])
    print(f"ratio_p99_pooled_summaries_on_over_off={ratio:.2f} ci90={lo:.2f}-{hi:.2f}")
    halves = segments["benchtext_off"][0::2], segments["benchtext_off"][1::2]
    if min(map(len, halves)) > 0:  # the same variant against itself: the noise
        ratio, lo, hi = pooled_p99_ratio(*halves)
        print(f"ratio_p99_pooled_off_odd_over_even={ratio:.2f} ci90={lo:.2f}-{hi:.2f}")
    for name, tag in zip(names, ("summaries_off", "summaries_on"), strict=True):
        pooled = [v for seg in segments[name] for v in seg]
        print(f"e2e_p99_ms_pooled_{tag}={quantile(pooled, 0.99):.1f}")
        slow = [  # the share of each segment's slowest 1% in its first tenth
            i / len(seg)
            for seg, cut in ((seg, quantile(seg, 0.99)) for seg in segments[name])
            for i, v in enumerate(seg)
            if v >= cut
        ]
        first = sum(x < 0.1 for x in slow) / max(len(slow), 1)
        print(f"slowest_1pct_share_in_first_tenth_of_segment_{tag}={first:.2f}")
    above = sum((a > b) + 0.5 * (a == b) for a in on for b in off) / (len(on) * len(off))
    print(f"p99_segment_pairs_on_above_off={above:.2f}")  # 0.5: no difference
    print(f"p99_spread_max_over_min_summaries_off={max(off) / min(off):.2f}")
    print(f"p99_spread_max_over_min_summaries_on={max(on) / min(on):.2f}")
    for name, tag in zip(names, ("summaries_off", "summaries_on"), strict=True):
        print(f"worker_prefetch_ms_per_text_{tag}={encode_ms[name]:.1f}")
    print(f"summaries_done={done} summaries_dropped_or_failed={lost}")
    print(f"annotator_drain_after_last_prediction_s_max={max(drains, default=0.0):.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=256, help="records per engine batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=32, help="texts per length-sorted run")
    parser.add_argument(
        "--small-batch", type=int, default=8, help="also measure batches this small (0: no)"
    )
    parser.add_argument("--small-events", type=int, default=400, help="events for those")
    parser.add_argument("--no-live", action="store_true", help="skip the broker + worker part")
    parser.add_argument("--live-only", action="store_true", help="only that part (give --rate)")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="live events/s (default: 0.2 of in-engine, at least 40)",
    )
    parser.add_argument("--live-seconds", type=float, default=20.0, help="per segment")
    parser.add_argument("--live-repeats", type=int, default=8)
    parser.add_argument(
        "--summary-sample",
        type=float,
        default=1.0,
        help="share of events summarised when summaries are on (the tickets spec ships 0.1)",
    )
    parser.add_argument(
        "--max-busy-share",
        type=float,
        default=None,
        help="annotate.max_busy_share when summaries are on (default: the spec's)",
    )
    parser.add_argument(
        "--keep", type=Path, help="a new directory to keep the workers' logs and state in"
    )
    args = parser.parse_args()
    if args.live_only and not args.rate:
        parser.error("--live-only needs --rate (the default rate comes from the other part)")
    print(f"load_avg_1_5_15_start={load()} cpus={os.cpu_count()}")
    print(f"summary_sample={args.summary_sample} max_busy_share={args.max_busy_share}")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        if args.keep:
            args.keep.mkdir(parents=True)  # a new directory: no state of an earlier run
        engine_eps = 0.0 if args.live_only else in_process(args, Path(tmp) / "inproc")
        if not args.no_live:
            rate = args.rate or max(40.0, min(300.0, round(0.2 * engine_eps / 10) * 10))
            progress(f"live part at {rate:.0f} events/s")
            live(args, rate, Path(tmp) / "live")
    print(f"load_avg_1_5_15_end={load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
