"""trainer: drift -> retrain -> evaluate -> register -> shadow -> promote or archive.

One trainer is active per app (consumer group ``<app_id>-trainer`` on the one-partition
control topic). It turns ``drift_detected`` into ``retrain_requested`` (the policy's
cooldown and de-duplication make a burst of detections one retrain), and serves every
``retrain_requested`` -- from drift, the schedule or ``streamml retrain`` -- the same way:
wait until the window holds enough labelled events, train, evaluate against the champion,
register and deploy the result as a challenger. Then it watches the challenger's labelled
metrics in ClickHouse and promotes it once it beats the champion over enough labels, or
archives it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer

from streamml import lifecycle
from streamml.config import Settings
from streamml.errors import StreamMLError
from streamml.models.online import positive_label
from streamml.models.policy import RetrainPolicy, RoleScore, judge_challenger
from streamml.models.registry import Registry
from streamml.models.serving import online_version
from streamml.schemas.control import ControlEvent
from streamml.schemas.spec import PipelineSpec
from streamml.streams import control
from streamml.streams.kafka import bounded, close_quietly
from streamml.streams.topics import CONTROL_TOPIC
from streamml.streams.warehouse import QueryResult

log = logging.getLogger("streamml.trainer")
Query = Callable[[str], QueryResult]
TICK_S = 2.0
PENDING_GIVE_UP_S = 600.0


@dataclass
class _Pending:
    """A retrain request waiting for enough labelled events in its window."""

    request: ControlEvent
    window: lifecycle.Window
    since: float


def score_sql(spec: PipelineSpec, champion: str, challenger: str, since_ms: int) -> str:
    """(model_version, value of promotion.metric, labelled events) for the champion's served
    predictions and the challenger's, over the events both scored since ``since_ms``."""
    name, pos = spec.name, str(positive_label(spec.label.positive)).replace("'", "")
    hit, truth = f"p.predicted_class = '{pos}'", f"l.label = '{pos}'"
    expressions = {
        "accuracy": "avg(p.predicted_class = l.label)",
        "roc_auc": f"arrayAUC(groupArray(p.score), groupArray({truth}))",
        "precision": f"countIf({hit} AND {truth}) / greatest(countIf({hit}), 1)",
        "recall": f"countIf({hit} AND {truth}) / greatest(countIf({truth}), 1)",
        "f1": f"2 * countIf({hit} AND {truth}) / greatest(countIf({hit}) + countIf({truth}), 1)",
        "rmse": "sqrt(avg(pow(p.score - l.label_value, 2)))",
        "mae": "avg(abs(p.score - l.label_value))",
    }
    value = expressions[spec.promotion.metric]
    return f"""
        SELECT p.model_version, {value}, count()
        FROM (
            SELECT event_id, model_version, any(predicted_class) AS predicted_class,
                   any(score) AS score
            FROM predictions
            WHERE pipeline = '{name}' AND inserted_at >= fromUnixTimestamp64Milli({since_ms})
              AND ((model_version = '{champion}' AND role = 'champion')
                   OR model_version = '{challenger}')
              AND event_id IN (SELECT event_id FROM predictions WHERE pipeline = '{name}'
                               AND model_version = '{challenger}')
            GROUP BY event_id, model_version
        ) AS p
        INNER JOIN (
            SELECT event_id, argMax(label, inserted_at) AS label,
                   argMax(label_value, inserted_at) AS label_value
            FROM labels WHERE pipeline = '{name}' GROUP BY event_id
        ) AS l ON p.event_id = l.event_id
        GROUP BY p.model_version
    """


class Trainer:
    def __init__(self, settings: Settings, specs: Sequence[PipelineSpec], query: Query) -> None:
        self.settings = settings
        self.specs = {s.name: s for s in specs if s.batch_model is not None}
        self.query = query
        self.policies = {name: RetrainPolicy(spec) for name, spec in self.specs.items()}
        self.pending: dict[str, _Pending] = {}
        self.watching: dict[str, tuple[str, int]] = {}  # pipeline -> (challenger, since ms)
        self.registry = Registry(settings.registry_path)
        self.status: dict[str, str] = {name: "idle" for name in self.specs}

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
        )
        await bounded(
            "start the trainer", s.bootstrap_servers, consumer.start(), s.request_timeout_s
        )
        for name in self.specs:  # a challenger left from before a restart is still judged
            challengers = self.registry.challengers(name)
            if challengers:
                self.watching[name] = (challengers[-1].version, int(time.time() * 1000))
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=int(TICK_S * 1000))
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
        elif event.action == "challenger_set" and name not in self.watching:
            # a challenger set by hand (or by another trainer before a restart) is judged too
            self.watching[name] = (event.version, event.ts_ms)
        elif (
            event.action in ("promoted", "archived")
            and name in self.watching
            and event.version == self.watching[name][0]
        ):  # resolved by hand before the trainer judged it
            self.watching.pop(name)
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
        for name, pending in list(self.pending.items()):
            await self._try_train(name, pending)
        for name in list(self.watching):
            await self._judge(name)

    def _labelled_rows(self, spec: PipelineSpec, window: lifecycle.Window) -> int:
        sql = f"SELECT count() FROM ({lifecycle.training_sql(spec, window)})"
        return int(self.query(sql).rows[0][0])

    async def _try_train(self, name: str, pending: _Pending) -> None:
        spec, policy = self.specs[name], self.policies[name]
        have = await asyncio.to_thread(self._labelled_rows, spec, pending.window)
        if have < spec.retrain.min_events:
            if time.monotonic() - pending.since > PENDING_GIVE_UP_S:
                log.warning("%s: gave up waiting for labelled events (%d)", name, have)
                self.pending.pop(name)
                policy.finished(time.monotonic(), None)
            return
        self.pending.pop(name)
        self.status[name] = f"training on {have} labelled events"
        log.info("%s: retraining on %d labelled events (%s)", name, have, pending.request.reason)
        try:
            outcome = await asyncio.to_thread(
                lifecycle.train_and_register,
                self.settings,
                spec,
                pending.window,
                reason=f"{pending.request.reason} [{pending.request.event_id}]",
                query=self.query,
            )
        except Exception as exc:  # whatever failed, the next request must be able to run
            if isinstance(exc, StreamMLError):
                log.error("%s: retraining failed: %s", name, exc)
            else:
                log.exception("%s: retraining failed unexpectedly: %s", name, exc)
            self.status[name] = f"retraining failed: {exc}"
            policy.finished(time.monotonic(), None)
            return
        challenger = (
            outcome.version.version if outcome.deployed_as.startswith("challenger") else None
        )
        policy.finished(time.monotonic(), challenger)
        if challenger:
            self.watching[name] = (challenger, int(time.time() * 1000))
        self.status[name] = f"{outcome.version.version}: {outcome.deployed_as}"

    def _scores(
        self, spec: PipelineSpec, challenger: str, since_ms: int
    ) -> tuple[RoleScore | None, RoleScore | None]:
        """Champion and challenger on the same labelled events: those the challenger scored
        (since it was deployed), joined with their labels in ClickHouse."""
        metric = spec.promotion.metric
        champion = self.registry.champion(spec.name)
        champion_version = champion.version if champion else online_version(spec)
        rows = self.query(score_sql(spec, champion_version, challenger, since_ms)).rows
        found = {str(r[0]): (float(r[1]), int(r[2])) for r in rows if r[1] is not None}
        champ = found.get(champion_version)
        chall = found.get(challenger)
        return (
            RoleScore(champion_version, metric, *champ) if champ else None,
            RoleScore(challenger, metric, *chall) if chall else None,
        )

    async def _judge(self, name: str) -> None:
        spec = self.specs[name]
        challenger, since_ms = self.watching[name]
        champ, chall = await asyncio.to_thread(self._scores, spec, challenger, since_ms)
        if chall is None:
            return
        decision = judge_challenger(champ, chall, spec.promotion)
        if decision.action == "wait":
            self.status[name] = f"{challenger}: {decision.reason}"
            return
        self.watching.pop(name)
        self.policies[name].challenger_resolved()
        try:
            if decision.action == "promote":
                await asyncio.to_thread(
                    lifecycle.promote, self.settings, spec, challenger, decision.reason
                )
            else:
                await asyncio.to_thread(
                    lifecycle.archive, self.settings, spec, challenger, decision.reason
                )
        except StreamMLError as exc:  # e.g. someone archived it by hand meanwhile
            log.warning("%s: could not %s %s: %s", name, decision.action, challenger, exc)
        self.status[name] = f"{challenger}: {decision.action}d ({decision.reason})"
