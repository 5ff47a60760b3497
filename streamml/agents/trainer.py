"""trainer: drift -> confirm -> retrain -> evaluate -> register -> shadow -> judge.

One trainer is active per app (consumer group ``<app_id>-trainer`` on the one-partition
control topic).

* A ``drift_detected`` of concept drift (one detector on one partition) is a suspicion. It
  is confirmed by a change-point test over the served model's errors on every partition's
  latest labelled events (:func:`judge.confirm_change`), which also dates the change; a
  suspicion not confirmed within ``CONFIRM_WITHIN_S`` is dismissed. Both are audited.
* A confirmed change becomes ``retrain_requested`` (the policy's cooldown and
  de-duplication make a burst of detections one retrain) whose window starts at the
  estimated change, never before. Drift, the schedule and ``streamml retrain`` are served
  the same way: wait until the window holds enough labelled events, train, evaluate,
  register, deploy the result as a challenger.
* Every ``REVIEW_EVERY_S`` every deployed model -- champion, batch challengers, the online
  model -- is judged on the same labelled events since the change (:func:`judge.review`):
  the best candidate whose paired bootstrap bound beats the champion by ``min_delta`` and
  which beats the trivial baseline is promoted (the online model by retiring the batch
  champion); a challenger that cannot win is archived; a champion below the baseline with
  no better candidate is reported and retrained. Every verdict is in the audit trail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import time
import uuid
from collections.abc import Awaitable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pandas as pd  # type: ignore[import-untyped]
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from streamml import lifecycle, sql
from streamml.agents import judge
from streamml.config import Settings
from streamml.errors import StreamMLError
from streamml.models import evaluation, training
from streamml.models.decision import ServingDecision
from streamml.models.policy import RetrainPolicy
from streamml.models.registry import Registry
from streamml.models.serving import ONLINE, online_version
from streamml.schemas.control import ControlEvent
from streamml.schemas.spec import PipelineSpec
from streamml.streams import control
from streamml.streams.kafka import bounded, client_options, close_quietly
from streamml.streams.topics import CONTROL_TOPIC

log = logging.getLogger("streamml.trainer")
Query = sql.Runner
TICK_S = 2.0
PENDING_GIVE_UP_S = 600.0
CONFIRM_WITHIN_S = 60.0  # a suspicion not confirmed by then is dismissed
REVIEW_EVERY_S = 2.0
GIVE_UP_REVIEWS = 10  # a challenger not qualified on this many full-window reviews: archived


@dataclass
class _Pending:
    """A retrain request waiting for enough labelled events in its window."""

    request: ControlEvent
    window: lifecycle.Window
    since: float


class Trainer:
    def __init__(self, settings: Settings, specs: Sequence[PipelineSpec], query: Query) -> None:
        self.settings = settings
        self.specs = {s.name: s for s in specs if s.batch_model is not None}
        self.query = query
        self.policies = {name: RetrainPolicy(spec) for name, spec in self.specs.items()}
        self.pending: dict[str, _Pending] = {}
        self.registry = Registry.from_settings(settings)
        self.status: dict[str, str] = {name: "idle" for name in self.specs}
        # pipeline -> (when a concept drift was suspected, event time the test starts from)
        self.suspects: dict[str, tuple[float, int]] = {}
        self.change_ms: dict[str, int] = {}  # pipeline -> event time of the confirmed change
        self.promoted_upto_ms: dict[str, int] = {}  # newest judged event at the last promotion
        self.reviewed_at: dict[str, float] = {}
        self.verdicts: dict[str, str] = {}  # pipeline -> the last review, in words
        self._last_actions: dict[str, dict[str, str]] = {}
        self._full_reviews: dict[str, int] = {}  # challenger -> reviews on a full window
        self._below_baseline_at: dict[str, float] = {}
        self.training: dict[str, asyncio.Task[None]] = {}  # retrains running now
        self._pool: ProcessPoolExecutor | None = None  # where models are fitted
        self.searched_from: dict[str, int] = {}  # where the last confirmation's test began
        self.fresh: dict[str, str | None] = {}  # the fresh online model started at the change

    async def run(self) -> None:
        if not self.specs:
            return
        s = self.settings
        consumer = AIOKafkaConsumer(
            CONTROL_TOPIC,
            bootstrap_servers=s.bootstrap_servers,
            group_id=f"{s.app_id}-trainer",
            auto_offset_reset="latest",
            enable_auto_commit=True,
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_s * 1000),
            **client_options(s),
        )
        await bounded(
            "start the trainer", s.bootstrap_servers, consumer.start(), s.request_timeout_s
        )
        self._fitter()
        try:
            while True:
                try:
                    batch = await consumer.getmany(timeout_ms=int(TICK_S * 1000))
                except KafkaError as exc:  # the broker is away: keep ticking meanwhile
                    log.warning("trainer: reading the control topic: %s", exc)
                    batch = {}
                    await asyncio.sleep(TICK_S)
                for records in batch.values():
                    for record in records:
                        try:
                            event = ControlEvent.from_json(record.value or b"")
                        except (ValueError, TypeError):
                            continue
                        if event.pipeline in self.specs:
                            await self._guarded(self._on_event(event))
                await self._guarded(self._tick())
        finally:
            for task in self.training.values():
                task.cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            await close_quietly(consumer.stop(), s.request_timeout_s)

    async def _guarded(self, step: Awaitable[None]) -> None:
        """A failed step is logged and retried on the next tick; it never stops the worker."""
        try:
            await step
        except Exception as exc:
            log.exception("trainer step failed (will retry): %s", exc)

    # --- events --------------------------------------------------------------------
    async def _on_event(self, event: ControlEvent) -> None:
        name, now = event.pipeline, time.monotonic()
        policy = self.policies[name]
        if event.action == "drift_detected":
            kind = str(event.details.get("kind", "concept"))
            if kind == "concept" and kind in policy.spec.kinds:
                if name not in self.suspects:  # confirmed or dismissed on the next ticks
                    self.suspects[name] = (now, self._since(name))
                    self.status[name] = f"checking a drift ({event.reason})"
                return
            drift_ts = int(event.details.get("event_ts_ms") or event.ts_ms)
            decision = policy.on_drift(kind, drift_ts, now)
            if decision.retrain:
                await self._request(
                    name, "drift", decision.reason, decision.since_ms, decision.last_events, event
                )
            else:
                log.info("%s: drift %s not retrained: %s", name, event.event_id, decision.reason)
        elif event.action == "retrain_requested" and name not in self.pending:
            if event.details.get("source") == "manual":
                decision = policy.on_manual(now)
                if not decision.retrain:
                    log.info("%s: manual retrain not started: %s", name, decision.reason)
                    return
            spec = self.specs[name]
            window = lifecycle.Window(
                since_ms=event.details.get("since_ms"),
                last_events=int(event.details.get("last_events") or spec.retrain.last_events),
            )
            policy.started(now)
            self.pending[name] = _Pending(event, window, now)
            self.status[name] = f"waiting for labelled events ({event.reason})"
        elif (
            event.action in ("promoted", "archived")
            and policy.challenger is not None
            and event.version == policy.challenger
        ):  # resolved (by the review or by hand): drift may retrain again
            policy.challenger_resolved()

    async def _request(
        self,
        name: str,
        source: str,
        reason: str,
        since_ms: int | None,
        last_events: int,
        cause: ControlEvent | None,
    ) -> None:
        event = ControlEvent.new(
            name,
            "retrain_requested",
            reason=reason,
            previous=cause.event_id if cause else "",
            details={"source": source, "since_ms": since_ms, "last_events": last_events},
        )
        await control.publish(self.settings, event)

    # --- timed work ------------------------------------------------------------------
    async def _tick(self) -> None:
        now = time.monotonic()
        for name, policy in self.policies.items():
            scheduled = policy.scheduled_due(now)
            if scheduled.retrain and name not in self.pending:
                await self._request(
                    name, "schedule", scheduled.reason, None, scheduled.last_events, None
                )
        for name in list(self.suspects):
            await self._confirm(name)
        for name, pending in list(self.pending.items()):
            if name not in self.training:  # one retrain of a pipeline at a time
                await self._try_train(name, pending)
        for name in self.specs:
            if now - self.reviewed_at.get(name, 0.0) >= REVIEW_EVERY_S:
                self.reviewed_at[name] = now
                await self._review(name)

    def _since(self, name: str) -> int:
        """Judge and test from the later of the confirmed change and the last promotion."""
        return max(self.change_ms.get(name, 0), self.promoted_upto_ms.get(name, 0))

    async def _confirm(self, name: str) -> None:
        spec, policy = self.specs[name], self.policies[name]
        suspected_at, search_from = self.suspects[name]
        found = await asyncio.to_thread(
            judge.confirm_change, spec, self.query, search_from, spec.retrain.last_events
        )
        if not found.confirmed or found.change_ts_ms is None:
            if time.monotonic() - suspected_at > CONFIRM_WITHIN_S:
                self.suspects.pop(name)
                log.info("%s: drift dismissed: %s", name, found.reason)
                self.status[name] = f"drift dismissed ({found.reason})"
                await self._audit(name, "drift_dismissed", found.reason, found)
            return
        self.suspects.pop(name)
        self.searched_from[name] = search_from
        change = found.change_ts_ms
        log.warning("%s: drift %s", name, found.reason)
        # the engines start a fresh online model at the change: one more candidate
        self.fresh[name] = f"{online_version(spec)}-fresh-{uuid.uuid4().hex[:6]}"
        await self._audit(name, "drift_confirmed", found.reason, found, self.fresh[name])
        self.change_ms[name] = max(change, self.change_ms.get(name, 0))
        self.reviewed_at[name] = 0.0  # judge what serves on the events since it, now
        decision = policy.on_drift("concept", change, time.monotonic())
        if decision.retrain:
            await self._request(
                name, "drift", decision.reason, decision.since_ms, decision.last_events, None
            )
        else:
            log.info("%s: confirmed drift not retrained: %s", name, decision.reason)
            self.status[name] = f"drift confirmed, not retrained: {decision.reason}"

    async def _audit(
        self,
        name: str,
        action: str,
        reason: str,
        found: judge.Confirmation,
        fresh_version: str | None = None,
    ) -> None:
        point = found.point
        details = {
            "fresh_version": fresh_version,
            "change_ts_ms": found.change_ts_ms,
            "events": found.events,
            "error_before": point.before if point else None,
            "error_after": point.after if point else None,
            "statistic": point.statistic if point else None,
            "p_value": point.p_value if point else None,
        }
        await control.publish(
            self.settings, ControlEvent.new(name, action, reason=reason, details=details)
        )

    async def _redate(
        self, name: str, window: lifecycle.Window, have: int
    ) -> tuple[lifecycle.Window, int]:
        spec = self.specs[name]
        found = await asyncio.to_thread(
            judge.confirm_change,
            spec,
            self.query,
            self.searched_from.pop(name),
            spec.retrain.last_events,
        )
        since = window.since_ms or 0
        if not found.confirmed or found.change_ts_ms is None or found.change_ts_ms <= since:
            return window, have
        log.info(
            "%s: change re-dated from %d to %d: %s", name, since, found.change_ts_ms, found.reason
        )
        self.change_ms[name] = max(found.change_ts_ms, self.change_ms.get(name, 0))
        redated = dataclasses.replace(window, since_ms=found.change_ts_ms)
        return redated, await asyncio.to_thread(self._labelled_rows, spec, redated)

    def _labelled_rows(self, spec: PipelineSpec, window: lifecycle.Window) -> int:
        count = sql.count_of(lifecycle.training_query(spec, window))
        return int(sql.run(self.query, count).rows[0][0])

    async def _try_train(self, name: str, pending: _Pending) -> None:
        spec, policy = self.specs[name], self.policies[name]
        have = await asyncio.to_thread(self._labelled_rows, spec, pending.window)
        if have >= spec.retrain.min_events and name in self.searched_from:
            # the change was dated when it was confirmed, from the few labelled events after
            # it then; with a window's worth of them now, date it again -- only ever later
            pending.window, have = await self._redate(name, pending.window, have)
        if have < spec.retrain.min_events:
            if time.monotonic() - pending.since > PENDING_GIVE_UP_S:
                log.warning("%s: gave up waiting for labelled events (%d)", name, have)
                self.pending.pop(name)
                policy.finished(time.monotonic(), None)
            return
        self.pending.pop(name)
        self.status[name] = f"training on {have} labelled events"
        log.info("%s: retraining on %d labelled events (%s)", name, have, pending.request.reason)
        # in the background: the reviews go on judging what serves while it trains
        self.training[name] = asyncio.create_task(self._train(name, pending))

    async def _train(self, name: str, pending: _Pending) -> None:
        spec, policy = self.specs[name], self.policies[name]
        try:
            outcome = await asyncio.to_thread(
                lifecycle.train_and_register,
                self.settings,
                spec,
                pending.window,
                reason=f"{pending.request.reason} [{pending.request.event_id}]",
                query=self.query,
                fit=self._fit,
            )
        except Exception as exc:  # whatever failed, the next request must be able to run
            if isinstance(exc, StreamMLError):
                log.error("%s: retraining failed: %s", name, exc)
            else:
                log.exception("%s: retraining failed unexpectedly: %s", name, exc)
            self.status[name] = f"retraining failed: {exc}"
            policy.finished(time.monotonic(), None)
            return
        finally:
            self.training.pop(name, None)
        challenger = (
            outcome.version.version if outcome.deployed_as.startswith("challenger") else None
        )
        policy.finished(time.monotonic(), challenger)
        self.status[name] = f"{outcome.version.version}: {outcome.deployed_as}"

    def _fit(
        self, spec: PipelineSpec, frame: pd.DataFrame, weak: pd.DataFrame | None
    ) -> tuple[training.TrainResult, evaluation.CVResult | None]:
        """Train and cross-validate in a process of its own: in the worker's process the
        training loops and the stream fight over the GIL (cross-validation of 1,700 rows
        took 11.8 s there, against ~1 s alone)."""
        return self._fitter().submit(evaluation.fit_and_validate, spec, frame, weak).result()

    def _fitter(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self._pool.submit(training.ready)  # torch imported before the first retrain
        return self._pool

    def _deployed(self, spec: PipelineSpec) -> tuple[str, list[str]]:
        """The serving champion's version and every other model scoring beside it."""
        champion = self.registry.champion(spec.name)
        online = online_version(spec)
        candidates = [c.version for c in self.registry.challengers(spec.name)]
        fresh = self.fresh.get(spec.name)
        if fresh:
            candidates.append(fresh)
        if champion is None:
            return online, candidates
        if spec.serving.challenger == ONLINE or spec.serving.champion == ONLINE:
            candidates.append(online)
        return champion.version, candidates

    async def _review(self, name: str) -> None:
        spec, policy = self.specs[name], self.policies[name]
        champion, candidates = await asyncio.to_thread(self._deployed, spec)
        if not candidates:
            return
        promo = spec.promotion
        t0 = time.perf_counter()
        result = await asyncio.to_thread(
            judge.review,
            spec,
            self.query,
            champion,
            candidates,
            self._since(name),
            promo.window,
            self.promoted_upto_ms.get(name, 0),
        )
        actions: dict[str, str] = {v: d.action for v, d in result.verdicts.items()}
        if actions != self._last_actions.get(name):
            log.info(
                "%s: review (%.0f ms) since %d: %s",
                name,
                (time.perf_counter() - t0) * 1000,
                self._since(name),
                result.summary,
            )
            self._last_actions[name] = actions
        self.verdicts[name] = result.summary
        if result.promote is not None:
            chosen = result.promote.version
            reason = f"judged: {result.promote.reason}"
            await self._judged(name, "promote", champion, result.promote)
            try:
                if chosen == online_version(spec):
                    await asyncio.to_thread(lifecycle.serve_online, self.settings, spec, reason)
                elif chosen == self.fresh.get(name):
                    await asyncio.to_thread(
                        lifecycle.serve_online, self.settings, spec, reason, chosen
                    )
                    self.fresh[name] = None
                else:
                    await asyncio.to_thread(lifecycle.promote, self.settings, spec, chosen, reason)
            except StreamMLError as exc:  # e.g. someone changed the registry meanwhile
                log.warning("%s: could not promote %s: %s", name, chosen, exc)
                return
            log.warning("%s: promoted %s: %s", name, chosen, result.promote.reason)
            if name not in self.suspects:
                # a champion lost its place: if the world changed under it, the served
                # errors show a rise -- test for it (an online model that adapts hides a
                # change from the detectors, and a batch model should then be retrained)
                self.suspects[name] = (time.monotonic(), self._since(name))
            self.promoted_upto_ms[name] = result.newest_ts_ms
            if chosen == policy.challenger:
                policy.challenger_resolved()
            self.status[name] = f"{chosen}: promoted ({result.promote.reason})"
            return
        for version, verdict in result.verdicts.items():
            if version in (online_version(spec), self.fresh.get(name)) or verdict.action == "wait":
                continue
            n = max((r.vs_champion.n for r in verdict.table), default=0)
            full = self._full_reviews[version] = self._full_reviews.get(version, 0) + (
                n >= promo.window
            )
            if judge.cannot_win(verdict, version, promo.min_delta) or full >= GIVE_UP_REVIEWS:
                reason = f"judged: cannot beat {champion} by {promo.min_delta:g}: {verdict.reason}"
                await self._judged(name, "archive", champion, verdict, version)
                try:
                    await asyncio.to_thread(lifecycle.archive, self.settings, spec, version, reason)
                except StreamMLError as exc:
                    log.warning("%s: could not archive %s: %s", name, version, exc)
                    continue
                log.info("%s: archived %s: %s", name, version, verdict.reason)
                if version == policy.challenger:
                    policy.challenger_resolved()
                self.status[name] = f"{version}: archived ({verdict.reason})"
        if result.below_baseline is not None:
            await self._below_baseline(name, champion, result.below_baseline)

    async def _judged(
        self,
        name: str,
        verdict: str,
        champion: str,
        decision: ServingDecision,
        version: str | None = None,
    ) -> None:
        """The verdict and every number behind it, in the audit trail (``judged``)."""
        spec = self.specs[name]
        event = ControlEvent.new(
            name,
            "judged",
            version=version or decision.version,
            previous=champion,
            reason=decision.reason,
            details={
                "verdict": verdict,
                "since_ms": self._since(name),
                "metric": spec.promotion.metric,
                "min_delta": spec.promotion.min_delta,
                "min_labeled_events": spec.promotion.min_labeled_events,
                "table": [dataclasses.asdict(row) for row in decision.table],
            },
        )
        await control.publish(self.settings, event)

    async def _below_baseline(self, name: str, champion: str, decision: ServingDecision) -> None:
        """The champion loses to the trivial baseline and nothing deployed beats it: say so
        (audit trail) and retrain, at most once per cooldown."""
        reason = decision.reason
        spec, policy = self.specs[name], self.policies[name]
        now = time.monotonic()
        last = self._below_baseline_at.get(name)
        if last is not None and now - last < spec.retrain.cooldown_s:
            return
        self._below_baseline_at[name] = now
        log.warning("%s: champion below the baseline: %s", name, reason)
        await self._judged(name, "below_baseline", champion, decision, champion)
        if not policy.busy and name not in self.pending:
            await self._request(
                name,
                "baseline",
                f"champion below the baseline: {reason}",
                self.change_ms.get(name),
                spec.retrain.last_events,
                None,
            )
