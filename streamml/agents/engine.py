"""The data plane of one pipeline in one worker: batches from Kafka through the steps.

One consumer group per pipeline (``<app_id>-<pipeline>``) reads ``<p>.raw`` and
``<p>.labels``; both have the same partition count and the range assignor gives a member
the same partition numbers of both, so a partition's events and labels meet here. Each
batch from ``getmany`` runs through the steps in order -- :func:`ingest` (validate +
featurize), :func:`score`, then :func:`on_label` -- and everything it produces (features,
predictions, dead letters, metrics and state changes) goes out as whole record batches.
Input offsets are committed only after the broker acknowledged those outputs
(at-least-once; ReplacingMergeTree collapses re-deliveries in ClickHouse).

Why not one Faust agent per step: Faust's per-message path (conductor, queues, stream
iteration, acks) measured 200-250 us per message per hop here, which capped the pipeline
at ~200 events/s; batching below it is what reaches a large fraction of a raw aiokafka
loop (docs/BENCHMARKS.md). Faust still runs the worker around this: its lifecycle,
signals, web server (/health, /metrics, /stats, /query) and logging.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from opentelemetry import trace

from streamml import telemetry
from streamml.agents.annotate import Annotator, annotate, prefetch, text_step
from streamml.agents.ingest import failed, ingest
from streamml.agents.learn import emit_metrics, housekeeping, on_label, snapshot
from streamml.agents.runtime import (
    FRESH,
    MODEL,
    STATS,
    WINDOW,
    Held,
    PartitionState,
    PipelineRuntime,
)
from streamml.agents.score import BatchOutputs, Scored, batch_outputs, serve
from streamml.config import Settings
from streamml.errors import StreamMLError
from streamml.models import serving
from streamml.models.breaker import Breaker, Trip
from streamml.models.drift import Reference
from streamml.models.online import OnlineLearner
from streamml.models.registry import Registry
from streamml.models.serving import ONLINE, Deployment, Slot, online_version
from streamml.schemas.control import ControlEvent
from streamml.streams import control
from streamml.streams.changelog import read_latest
from streamml.streams.kafka import bounded, client_options, close_quietly
from streamml.streams.outbox import RETRY_FIRST_S, RETRY_MAX_S, Headers, Health, Outbox
from streamml.streams.producer import SEQ_HEADER
from streamml.streams.topics import CONTROL_TOPIC, dumps

log = logging.getLogger("streamml.engine")

HOUSEKEEPING_EVERY_S = 1.0
PROBE_EVERY_S = 2.0  # how often the engine checks that Kafka answers (for /health)
SLOW_BATCH_S = 0.1  # a batch taking longer is logged with where the time went


def _order_key(message: ConsumerRecord[Any, Any], is_label: bool) -> tuple[int, int, int, int]:
    """Produced order: timestamp, the producer's sequence header, raw before label, offset."""
    seq = 0
    for key, value in message.headers or ():
        if key == SEQ_HEADER:
            with suppress(ValueError):
                seq = int(value)
            break
    return (message.timestamp, seq, 1 if is_label else 0, message.offset)


def _traceparent_id(headers: Iterable[tuple[str, bytes]]) -> str:
    """The trace id of a W3C ``traceparent`` header, without building an OTel context."""
    for key, value in headers:
        if key == "traceparent" and len(value) >= 35:
            return value[3:35].decode("latin-1")
    return ""


def _needs_annotator(rt: PipelineRuntime) -> bool:
    """Whether the spec samples events for summaries, generative labels or the judge."""
    a = rt.spec.annotate
    return bool(
        a.summaries is not None
        or (a.weak_labels is not None and a.weak_labels.generative_sample > 0)
        or (a.flags is not None and a.flags.judge_sample > 0)
    )


class PipelineEngine:
    """Runs one pipeline's steps over batches of its partitions assigned to this worker."""

    def __init__(self, settings: Settings, rt: PipelineRuntime) -> None:
        self.settings = settings
        self.rt = rt
        self.ready = asyncio.Event()
        self.group_id = f"{settings.app_id}-{rt.name}"
        self._lock = asyncio.Lock()
        self._uncommitted: dict[TopicPartition, int] = {}
        self._committed_at = time.monotonic()
        self._housekept_at = time.monotonic()
        self._seen_ts: dict[TopicPartition, int] = {}  # newest record timestamp fetched
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.registry = Registry.from_settings(settings)
        # the online model alone until the registry has been read
        self.deployment = Deployment(
            Slot("champion", ONLINE, rt.spec.online_model.kind, online_version(rt.spec))
        )
        self._reload: ControlEvent | None = None
        # a fresh online model started at the last confirmed change, shadowing until the
        # trainer promotes it (its weights then replace the online model's) or a newer
        # change restarts it; events about it wait here for the next gap between batches
        self.fresh_version: str | None = None
        self._fresh_events: list[ControlEvent] = []
        # what Kafka makes us wait for (a broker restart, a leader moving), for /health
        self.kafka = Health()
        self.breaker = Breaker(
            settings.breaker_window_s, settings.breaker_failure_ratio, settings.breaker_min_records
        )
        self._resync = False  # the control follower restarted: re-read the registry

    # --- lifecycle ---------------------------------------------------------------
    async def run(self) -> None:
        """Consume, process and commit until cancelled (the worker stopping)."""
        s, rt = self.settings, self.rt
        boot = s.bootstrap_servers
        self._producer = producer = AIOKafkaProducer(
            bootstrap_servers=boot,
            acks="all",
            linger_ms=0,
            max_batch_size=1 << 20,
            request_timeout_ms=int(s.request_timeout_s * 1000),
            **client_options(s),
        )
        self._consumer = consumer = AIOKafkaConsumer(
            bootstrap_servers=boot,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.batch_max_records,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_s * 1000),
            rebalance_timeout_ms=int(s.rebalance_timeout_s * 1000),
            request_timeout_ms=int(max(s.request_timeout_s, s.session_timeout_s + 5) * 1000),
            **client_options(s),
        )
        await bounded("start the producer", boot, producer.start(), s.request_timeout_s)
        background: list[asyncio.Task[None]] = []
        if rt.text is not None:  # load the text models now: a refused one fails the start
            await asyncio.to_thread(rt.text.warm)
        if _needs_annotator(rt):
            queue = rt.spec.annotate.summaries.queue if rt.spec.annotate.summaries else 1000
            rt.annotator = Annotator(
                rt, queue, rt.spec.annotate.max_busy_share, cache_dir=s.cache_dir
            )
            background.append(asyncio.create_task(rt.annotator.run(producer)))
        following = asyncio.Event()
        control = asyncio.create_task(self._follow_control(following))
        waiting = asyncio.ensure_future(following.wait())
        await asyncio.wait({control, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if control.done():  # it could not follow the control topic: say why
            waiting.cancel()
            control.result()
        # from here on no deployment change is missed ...
        await self._apply_deployment(None)  # ... and this reads what is deployed now
        await bounded("start the consumer", boot, consumer.start(), s.request_timeout_s)
        consumer.subscribe([rt.topics["raw"], rt.topics["labels"]], listener=_Listener(self))
        probe = asyncio.create_task(self._probe_kafka())
        delay = RETRY_FIRST_S
        try:
            while True:
                try:
                    await self._step(consumer)
                    delay = RETRY_FIRST_S
                except KafkaError as exc:  # the broker is away: wait for it, keep the state
                    self.kafka.last_error = f"{type(exc).__name__}: {exc}"[:500]
                    if self.kafka.waiting_since is None:
                        self.kafka.waiting_since = time.monotonic()
                    log.warning("%s: Kafka: %s; again in %.1f s", rt.name, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
        finally:
            control.cancel()
            probe.cancel()
            for task in background:
                task.cancel()
            await self._shutdown()

    async def _step(self, consumer: AIOKafkaConsumer) -> None:
        """One turn of the loop: fetch, then between batches apply deployment changes,
        process, keep house and commit."""
        s = self.settings
        batch = await consumer.getmany(timeout_ms=100, max_records=s.batch_max_records)
        async with self._lock:
            if self._fresh_events:
                await self._apply_fresh()
            if self._resync:  # control events may have been missed: read the registry
                self._resync = False
                await self._apply_deployment(None)
            if self._reload is not None:  # between batches: no event scored twice
                event, self._reload = self._reload, None
                await self._apply_deployment(event)
            if batch or any(st.held for st in self.rt.states.values()):
                await self._process(batch)
            if time.monotonic() - self._housekept_at >= HOUSEKEEPING_EVERY_S:
                await self._housekeeping(self.rt.states.values())
            if time.monotonic() - self._committed_at >= s.commit_interval_ms / 1000:
                await self._commit()
        if self.kafka.waiting_since is not None and not self._uncommitted:
            self.kafka.waiting_since = None  # everything out and committed again

    async def _probe_kafka(self) -> None:
        """Ask the cluster for metadata every few seconds, so /health says degraded while
        the broker is away even when there is nothing to send or commit."""
        assert self._producer is not None
        client = self._producer.client
        timeout_s = min(PROBE_EVERY_S * 2, self.settings.request_timeout_s)
        while True:
            try:
                ok = await asyncio.wait_for(client.force_metadata_update(), timeout_s)
            except (TimeoutError, KafkaError, OSError):
                ok = False
            if ok:
                self.kafka.unreachable_since = None
            elif self.kafka.unreachable_since is None:
                self.kafka.unreachable_since = time.monotonic()
                self.kafka.last_error = "no broker answers metadata requests"
                log.warning("%s: Kafka is unreachable; waiting for it", self.rt.name)
            await asyncio.sleep(PROBE_EVERY_S)

    def health(self) -> dict[str, Any]:
        """For /health: ready, and whether Kafka keeps this pipeline waiting."""
        return {
            "ready": self.ready.is_set(),
            "kafka": self.kafka.describe(),
            "breaker_open": sorted(self.breaker.open),
        }

    # --- deployment ----------------------------------------------------------------
    async def _follow_control(self, following: asyncio.Event) -> None:
        """Follow the control topic for good: when following fails after it started (the
        broker went away), start again from the end and re-read the registry, which holds
        every deployment change that may have been missed meanwhile."""
        delay = RETRY_FIRST_S
        while True:
            try:
                async for event in control.follow(self.settings, following):
                    delay = RETRY_FIRST_S
                    self._on_control(event)
            except (KafkaError, StreamMLError, OSError) as exc:
                if not following.is_set():
                    raise  # at start: say why
                log.warning(
                    "%s: following the control topic: %s; again in %.1f s", self.rt.name, exc, delay
                )
            following = asyncio.Event()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            self._resync = True

    def _on_control(self, event: ControlEvent) -> None:
        if event.pipeline != self.rt.name:
            return
        if (event.action == "drift_confirmed" and event.details.get("fresh_version")) or (
            event.action == "promoted" and event.version == self.fresh_version
        ):
            self._fresh_events.append(event)
        if event.changes_deployment:
            self._reload = event

    async def _apply_deployment(self, event: ControlEvent | None) -> None:
        """Swap in what the registry says is deployed, or keep serving what is loaded
        when a model does not verify (and say so on the control topic)."""
        rt = self.rt
        try:
            deployment = await asyncio.to_thread(
                serving.plan, rt.spec, self.registry, self.deployment
            )
        except StreamMLError as exc:
            rt.counters["models_refused"] += 1
            log.error(
                "%s: model refused, still serving %s: %s", rt.name, self.deployment.describe(), exc
            )
            refused = ControlEvent.new(
                rt.name,
                "model_refused",
                version=getattr(exc, "version", None) or (event.version if event else ""),
                reason=str(exc),
                details={"serving": self.deployment.describe()},
            )
            try:
                await control.publish(self.settings, refused)
            except StreamMLError as exc:  # it keeps serving; the log says what was refused
                log.warning("%s: could not publish model_refused: %s", rt.name, exc)
            return
        changed = deployment.champion != self.deployment.champion
        if deployment != self.deployment:
            log.info("%s: now serving %s", rt.name, deployment.describe())
            rt.counters["deployments"] += 1
        self.deployment = self._with_fresh(deployment)
        if changed:  # data drift is measured against what the serving model learned from
            reference = self._reference()
            for state in rt.states.values():
                if state.monitor is not None:
                    state.monitor.set_reference(reference)

    def _with_fresh(self, deployment: Deployment) -> Deployment:
        """The deployment with the fresh online model, if one runs, as a shadow."""
        if self.fresh_version is None or any(
            s.version == self.fresh_version for s in deployment.challengers
        ):
            return deployment
        fresh = Slot("shadow", ONLINE, self.rt.spec.online_model.kind, self.fresh_version)
        return Deployment(deployment.champion, (*deployment.challengers, fresh))

    async def _apply_fresh(self) -> None:
        """Start a fresh online model in every partition (a change was confirmed), or make
        the fresh one the pipeline's online model (the trainer promoted it): its weights
        replace the online model's, which keeps its name, and the fresh slot ends."""
        assert self._producer is not None
        events, self._fresh_events = self._fresh_events, []
        rt = self.rt
        out = Outbox(self._producer, self.kafka)
        for event in events:
            if event.action == "drift_confirmed":
                version = str(event.details["fresh_version"])
                self.fresh_version = version
                for state in rt.states.values():
                    state.fresh = OnlineLearner(rt.spec, version=version)
                log.info("%s: fresh online model %s started at the change", rt.name, version)
            elif self.fresh_version is not None and event.version == self.fresh_version:
                for state in rt.states.values():
                    if state.fresh is not None:
                        state.learner.model = state.fresh.model
                        state.fresh = None
                    snapshot(rt, state, out)
                    out.add(rt.topics["state"], state.partition, FRESH, None)
                log.info(
                    "%s: fresh online model %s promoted: its weights serve as %s",
                    rt.name,
                    self.fresh_version,
                    online_version(rt.spec),
                )
                self.fresh_version = None
        self.deployment = self._with_fresh(
            Deployment(
                self.deployment.champion,
                tuple(
                    s
                    for s in self.deployment.challengers
                    if s.kind != ONLINE or s.version == online_version(rt.spec)
                ),
            )
        )
        await out.flush()

    async def _shutdown(self) -> None:
        try:
            async with self._lock:
                await self._let_go(list(self.rt.states), self.settings.request_timeout_s)
        except Exception:  # the next owner re-reads what was not committed
            log.exception("%s: final flush failed; uncommitted input will be re-read", self.rt.name)
        finally:
            timeout_s = self.settings.request_timeout_s
            if self._consumer is not None:
                await close_quietly(self._consumer.stop(), timeout_s)
            if self._producer is not None:
                await close_quietly(self._producer.stop(), timeout_s)

    # --- the batch ---------------------------------------------------------------
    async def _process(self, batch: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        """Apply what is ready of each partition, in produced order, and send the outputs.

        A partition's raw records and labels come from two topics; they are merged into
        the order they were produced (:class:`Held`: timestamp, producer sequence, raw
        before label, offset). A record is applied once the other topic has been read up
        to its timestamp (or is read to its end); until then it is held, at most
        ``order_max_wait_ms``. So a label produced between two events is learned between
        them, whatever batches the fetches happened to make."""
        t_start = time.perf_counter()
        rt = self.rt
        assert self._consumer is not None and self._producer is not None
        consumer = self._consumer
        tel = rt.telemetry
        raw_topic = rt.topics["raw"]
        assigned = consumer.assignment()
        out = Outbox(self._producer, self.kafka)
        outcomes: Counter[tuple[str, str]] = Counter()
        spent = {"ingest": 0.0, "score": 0.0, "learn": 0.0}
        now = time.monotonic()
        for tp, records in batch.items():
            if tp not in assigned or not records:
                continue  # revoked while fetched: its new owner reads it again
            state = rt.states[tp.partition]
            is_label = tp.topic != raw_topic
            for message in records:
                state.held.append(Held(_order_key(message, is_label), is_label, message, now))
            self._seen_ts[tp] = max(self._seen_ts.get(tp, 0), records[-1].timestamp)
        touched: list[PartitionState] = []
        done: dict[TopicPartition, int] = {}
        prepared: list[tuple[int, PartitionState, list[Held]]] = []
        for p, state in list(rt.states.items()):
            if not state.held:
                continue
            ready = await self._release(state)
            if ready:
                prepared.append((p, state, ready))
        if rt.text is not None and prepared:  # one text-model call for the whole batch
            raw = [h.message for _, _, ready in prepared for h in ready if not h.is_label]
            await prefetch(rt, raw)
        for p, state, ready in prepared:
            touched.append(state)
            self._apply(state, ready, out, outcomes, spent)
            for topic in (raw_topic, rt.topics["labels"]):
                tp = TopicPartition(topic, p)
                applied = [h.message.offset for h in ready if h.message.topic == topic]
                if not applied:
                    continue
                waiting = [h.message.offset for h in state.held if h.message.topic == topic]
                done[tp] = min(waiting) if waiting else max(applied) + 1
        if not touched:
            return
        self._log_state(touched, out)
        self._report_drift(touched, out)
        t_flush = time.perf_counter()
        sent = await out.flush()
        self._uncommitted.update(done)
        t_end = time.perf_counter()
        if t_end - t_start > SLOW_BATCH_S:
            log.warning(
                "%s: slow batch: %d records in, %d out; processing %.0f ms, delivery %.0f ms",
                rt.name,
                sum(len(r) for r in batch.values()),
                sent,
                (t_flush - t_start) * 1000,
                (t_end - t_flush) * 1000,
            )
        for (step, outcome), n in outcomes.items():
            tel.count(rt.name, step, outcome, n)
        for step, seconds in spent.items():
            n = sum(v for (s, _), v in outcomes.items() if s == step)
            if n:
                tel.observe(rt.name, step, seconds * 1000 / n)

    async def _release(self, state: PartitionState) -> list[Held]:
        """The held records of a partition that may be applied now, in produced order."""
        assert self._consumer is not None
        consumer = self._consumer
        bound = None
        for topic in (self.rt.topics["raw"], self.rt.topics["labels"]):
            tp = TopicPartition(topic, state.partition)
            highwater = consumer.highwater(tp)
            if highwater is not None and await consumer.position(tp) >= highwater:
                # read to its end: anything it gets later is produced after its last fetch
                reached = consumer.last_poll_timestamp(tp)
            else:
                reached = self._seen_ts.get(tp, -1)
            bound = reached if bound is None else min(bound, reached)
        state.held.sort()
        oldest = time.monotonic() - self.settings.order_max_wait_ms / 1000
        n = 0
        for held in state.held:
            if held.key[0] > (bound if bound is not None else -1) and held.fetched_at > oldest:
                break
            n += 1
        if n < len(state.held) and n:
            self.rt.counters["records_held"] += len(state.held) - n
        ready, state.held = state.held[:n], state.held[n:]
        return ready

    def _apply(
        self,
        state: PartitionState,
        ready: list[Held],
        out: Outbox,
        outcomes: Counter[tuple[str, str]],
        spent: dict[str, float],
    ) -> None:
        """validate + featurize the raw records, score them with the batch models in one
        call each, then walk the records in order: each event is predicted by the online
        model and served, each label learned, so labels affect only later events."""
        rt = self.rt
        tel = rt.telemetry
        t0 = time.perf_counter()
        items: dict[int, Scored] = {}
        links: list[trace.Link] = []
        for i, held in enumerate(ready):
            if held.is_label:
                continue
            message = held.message
            incoming: Headers = message.headers or ()
            mark = out.mark()
            try:
                if tel.enabled:  # a span per event, continuing the producer's trace
                    with tel.tracer.start_as_current_span(
                        f"{rt.name}.ingest", context=telemetry.extract(incoming)
                    ) as span:
                        headers: Headers = telemetry.inject()
                        result = ingest(rt, state, message, headers, out)
                        trace_id = telemetry.trace_id()
                        links.append(trace.Link(span.get_span_context()))
                else:  # no spans: pass the producer's trace context on as it came
                    headers = incoming
                    result = ingest(rt, state, message, headers, out)
                    trace_id = _traceparent_id(incoming)
            except Exception as exc:  # a record is data, never the end of the worker
                out.rollback(mark)
                failed(rt, message, "featurize", exc, out, incoming)
                result = None
            if result is None:
                outcomes["ingest", "dead_letter"] += 1
            else:
                outcomes["ingest", "ok"] += 1
                items[i] = Scored(message, *result, headers, trace_id)
        if rt.text is not None:  # text features of the whole batch (validate+featurize)
            text_step(rt, state, items, out)
        t1 = time.perf_counter()
        spent["ingest"] += t1 - t0
        deployment = self.deployment
        scoring: AbstractContextManager[Any] = (
            tel.tracer.start_as_current_span(f"{rt.name}.score", links=links)
            if tel.enabled
            else nullcontext()
        )
        annotating = "annotations" in rt.topics
        with scoring:
            batch = self._batch_outputs(deployment, items, out)
            scored = list(items.values())
            index = {i: n for n, i in enumerate(items)}
            t_learn = 0.0
            for i, held in enumerate(ready):
                mark = out.mark()
                if held.is_label:
                    t2 = time.perf_counter()
                    try:
                        outcome = on_label(rt, state, held.message, out)
                    except Exception as exc:
                        out.rollback(mark)
                        failed(rt, held.message, "learn", exc, out, held.message.headers or ())
                        outcome = "failed"
                    outcomes["learn", outcome] += 1
                    t_learn += time.perf_counter() - t2
                elif i in items:
                    try:
                        made = serve(rt, state, items[i], index[i], batch, deployment, out)
                        if annotating:
                            annotate(rt, state, items[i], made, out)
                    except Exception as exc:
                        out.rollback(mark)
                        failed(rt, held.message, "score", exc, out, items[i].headers)
                        outcomes["score", "failed"] += 1
        spent["learn"] += t_learn
        spent["score"] += time.perf_counter() - t1 - t_learn
        outcomes["score", "ok"] += len(scored) - outcomes["score", "failed"]
        self._breaker_count(len(ready))

    def _batch_outputs(
        self, deployment: Deployment, items: dict[int, Scored], out: Outbox
    ) -> BatchOutputs:
        """The batch models on every item in one call each; when a call fails, each item on
        its own, and the items no model can score become dead letters."""
        try:
            return batch_outputs(deployment, list(items.values()))
        except Exception:
            pass
        for i, it in list(items.items()):
            try:
                batch_outputs(deployment, [it])
            except Exception as exc:
                failed(self.rt, it.message, "score", exc, out, it.headers)
                del items[i]
        return batch_outputs(deployment, list(items.values()))

    def _breaker_count(self, handled: int) -> None:
        """Feed the circuit breaker this batch's records and dead letters, and raise or
        clear its alerts: a flood of bad records is an alert, and the pipeline goes on."""
        rt, now = self.rt, time.monotonic()
        failures = sum(rt.failures.values())
        self.breaker.count(now, None, max(0, handled - failures))
        for cause, n in rt.failures.items():
            self.breaker.count(now, cause, n)
        rt.failures.clear()

    def _log_state(self, states: Iterable[PartitionState], out: Outbox) -> None:
        """Changed windows and statistics to the state changelog, once per key per batch."""
        topic = self.rt.topics["state"]
        for state in states:
            for entity in state.dirty_windows:
                window = state.windows.get(entity)
                if window is not None:
                    out.add(topic, state.partition, WINDOW + entity.encode(), dumps(window))
            state.dirty_windows.clear()
            if state.stats_dirty:
                out.add(topic, state.partition, STATS, dumps(state.stats.data))
                state.stats_dirty = False

    def _report_drift(self, states: Iterable[PartitionState], out: Outbox) -> None:
        """Each detection -> ``drift_detected`` on the control topic (and so a row in
        ClickHouse ``drift_events``); the trainer decides whether it means a retrain."""
        rt = self.rt
        version = self.deployment.champion.version
        for state in states:
            for detection, event_ts_ms, change_ts_ms in state.detections:
                rt.counters[f"drift.{detection.kind}"] += 1
                event = ControlEvent.new(
                    rt.name,
                    "drift_detected",
                    version=version,
                    reason=(
                        f"{detection.detector} on {detection.target}: statistic "
                        f"{detection.statistic:.4g} vs threshold {detection.threshold:.4g}"
                    ),
                    details={
                        "detector": detection.detector,
                        "kind": detection.kind,
                        "target": detection.target,
                        "statistic": detection.statistic,
                        "threshold": detection.threshold,
                        "window": detection.window,
                        "at": detection.at,
                        "partition": state.partition,
                        "event_ts_ms": event_ts_ms,
                        "change_ts_ms": change_ts_ms,
                    },
                )
                log.warning("%s: drift detected: %s", rt.name, event.reason)
                out.add(CONTROL_TOPIC, 0, rt.name.encode(), event.to_json())
            state.detections.clear()

    def _report_trips(self, trips: list[Trip], out: Outbox) -> None:
        """The circuit breaker opening or closing for a cause -> an ``alert`` event."""
        rt, s = self.rt, self.settings
        for trip in trips:
            rt.counters[f"breaker.{trip.state}"] += 1
            message = f"{trip.failed} of {trip.total} records ({trip.share:.0%}) failed with " + (
                f"{trip.cause} in {s.breaker_window_s:.0f} s"
            )
            if trip.state == "firing":
                message += ": they are dead letters, and the pipeline goes on"
            level = logging.ERROR if trip.state == "firing" else logging.INFO
            log.log(level, "%s: circuit breaker %s: %s", rt.name, trip.state, message)
            event = ControlEvent.new(
                rt.name,
                "alert",
                reason=message,
                details={
                    "rule": f"breaker:{trip.cause}",
                    "state": trip.state,
                    "metric": "failed_share",
                    "value": trip.share,
                    "threshold": s.breaker_failure_ratio,
                    "op": ">",
                    "window_s": s.breaker_window_s,
                },
            )
            out.add(CONTROL_TOPIC, 0, rt.name.encode(), event.to_json())

    def _reference(self) -> Reference | None:
        """The training distribution stored with a batch champion (data/prediction drift)."""
        entry = self.deployment.champion.entry
        data = entry.metadata.get("extra", {}).get("reference") if entry is not None else None
        return Reference.from_json(data) if data else None

    async def _housekeeping(self, states: Iterable[PartitionState]) -> None:
        assert self._producer is not None
        out = Outbox(self._producer, self.kafka)
        for state in states:
            housekeeping(self.rt, state, out)
        self._report_trips(self.breaker.roll(time.monotonic()), out)
        await out.flush()
        self._housekept_at = time.monotonic()

    async def _commit(self) -> None:
        self._committed_at = time.monotonic()
        if not self._uncommitted or self._consumer is None:
            return
        offsets, self._uncommitted = self._uncommitted, {}
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:  # a rebalance took them
            log.warning("%s: commit refused (%s); the new owner re-reads", self.rt.name, exc)
        except KafkaError:  # the broker is away: commit them with the next ones
            assigned = self._consumer.assignment()
            for tp, offset in offsets.items():
                if tp in assigned:
                    self._uncommitted[tp] = max(offset, self._uncommitted.get(tp, 0))
            raise

    # --- partitions coming and going --------------------------------------------
    async def _let_go(self, partitions: list[int], give_up_s: float | None = None) -> None:
        """Before partitions may leave this worker: their last metrics and model snapshot
        out, then the offsets committed. The state stays cached: the next assignment
        drops what went elsewhere and reads back only what is new."""
        assert self._producer is not None
        out = Outbox(self._producer, self.kafka)
        for p in partitions:
            state = self.rt.states.get(p)
            if state is None:
                continue
            state.held.clear()  # not applied, not committed: whoever owns it next reads them
            for tp in [tp for tp in self._seen_ts if tp.partition == p]:
                del self._seen_ts[tp]
            for window in state.minutes.values():
                if window.n:
                    emit_metrics(self.rt, state, window, out)
            if state.learner.learned != state.snapshot_learned:
                snapshot(self.rt, state, out)
        await out.flush(give_up_s)
        await self._commit()

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            await self._let_go(sorted({tp.partition for tp in revoked}))

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        rt = self.rt
        async with self._lock:
            mine = {tp.partition for tp in assigned if tp.topic == rt.topics["raw"]}
            for p in set(rt.states) - mine:
                rt.states.pop(p)
            new = sorted(mine - set(rt.states))
            logs = await read_latest(self.settings, rt.topics["state"], new)
            for p, entries in logs.items():
                rt.states[p] = PartitionState.restore(rt.spec, p, entries)
                monitor = rt.states[p].monitor
                if monitor is not None:
                    monitor.set_reference(self._reference())
                if MODEL in entries:
                    rt.counters["model_restored"] += 1
                fresh = rt.states[p].fresh
                if fresh is not None and self.fresh_version is None:
                    self.fresh_version = fresh.version  # after a restart: it shadows again
                    self.deployment = self._with_fresh(self.deployment)
            log.info("%s: partitions %s (restored %s)", rt.name, sorted(mine), new)
            self.ready.set()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, engine: PipelineEngine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.engine.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.engine.on_assigned(assigned)
