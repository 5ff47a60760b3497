"""The model lifecycle on the real broker and chDB, as a user drives it: train a batch
model from what the pipeline logged, shadow it, promote it under load, roll it back, and
watch a corrupted artifact get refused while the old model keeps serving.

One pipeline and two workers (one consumer group, one shared registry; only the first
owns the embedded warehouse and runs the sink) serve the whole module; the tests run in
file order and each states the deployment it starts from.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from streamml import lifecycle
from streamml.config import Settings
from streamml.devstack.worker import WorkerProcess
from streamml.errors import ArtifactIntegrityError
from streamml.lifecycle import Outcome, Window
from streamml.models.onnx_model import read_metadata
from streamml.models.registry import Registry
from streamml.models.serving import online_version
from streamml.models.synthetic import Example, payments
from streamml.schemas.catalog import load_pipelines
from streamml.schemas.control import ControlEvent
from streamml.schemas.spec import PipelineSpec
from streamml.streams import control
from streamml.streams.kafka import ensure_pipeline_topics
from streamml.streams.producer import produce_examples
from streamml.testing import free_port

from .helpers import pipeline_dir, scalar, wait_for, wait_until, worker_settings

NAME = "lifecycle"
LOGGED_BEFORE_CUTOFF, LOGGED_AFTER_CUTOFF = 2000, 1000


def _small_batch_model(spec: dict[str, Any]) -> None:
    """The demo spec with one quick training run instead of a 6-trial search, and a
    promotion rule that trusts a test split of this size."""
    batch = spec["batch_model"]
    batch.pop("search")
    batch.update(epochs=10, cv_folds=2)
    spec["promotion"]["min_labeled_events"] = 100
    if "retrain" in spec:  # the test drives the lifecycle; drift must not retrain on its own
        spec["retrain"]["on_drift"] = False


@dataclass
class Lab:
    settings: Settings  # the sink worker's: lifecycle calls query the warehouse through it
    spec: PipelineSpec
    sink: WorkerProcess  # owns chDB, runs the warehouse sink
    other: WorkerProcess  # same consumer group, no sink
    registry: Registry
    cutoff_ms: int
    outcome: Outcome
    seeds: Iterator[int]

    @property
    def workers(self) -> tuple[WorkerProcess, WorkerProcess]:
        return self.sink, self.other

    @property
    def online(self) -> str:
        return online_version(self.spec)

    def produce(self, examples: Iterable[Example], **options: Any) -> int:
        return _produce(self.settings, self.spec, examples, **options)

    def fresh(self, n: int) -> tuple[str, list[Example]]:
        """``n`` payments never sent before, and the event-id prefix that selects them."""
        seed = next(self.seeds)
        return f"pay-{seed}-", list(payments(n, seed=seed))

    def champions(self) -> list[dict[str, Any]]:
        return [w.get("/stats")["pipelines"][NAME]["deployment"]["champion"] for w in self.workers]

    def serving(self, version: str) -> None:
        """Wait until both workers serve ``version`` as champion."""
        try:
            wait_until(
                lambda: all(c["version"] == version for c in self.champions()),
                f"both workers to serve {version}",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; they serve {self.champions()}") from None

    def ensure_champion(self, version: str) -> None:
        champion = self.registry.champion(NAME)
        if champion is None or champion.version != version:
            lifecycle.promote(self.settings, self.spec, version, reason="test setup")
        self.serving(version)

    def served(self, prefix: str) -> list[tuple[str, str, str]]:
        """(event_id, entity_key, model_version) of every served prediction of a batch."""
        rows = self.sink.query(
            "SELECT event_id, entity_key, model_version FROM predictions FINAL "
            f"WHERE pipeline = '{NAME}' AND served = 1 AND startsWith(event_id, '{prefix}')"
        )[1]
        return [(str(e), str(k), str(v)) for e, k, v in rows]

    def all_served_once(self, prefix: str, n: int) -> list[tuple[str, str, str]]:
        """Wait for ``n`` served events of the batch, then check that each was served
        exactly once (a second served row, by any version, would survive FINAL)."""
        where = f"pipeline = '{NAME}' AND served = 1 AND startsWith(event_id, '{prefix}')"
        wait_for(self.sink, f"SELECT uniqExact(event_id) FROM predictions WHERE {where}", n)
        time.sleep(2)  # the sink flushes every second: anything extra would show by now
        rows = self.served(prefix)
        assert len(rows) == n, f"{len(rows)} served rows for {n} events"
        assert len({e for e, _, _ in rows}) == n
        return rows

    def audit(self, action: str) -> list[dict[str, Any]]:
        cols, rows = self.sink.query(
            "SELECT action, version, previous, reason, details FROM audit_events FINAL "
            f"WHERE pipeline = '{NAME}' AND action = '{action}' ORDER BY ts"
        )
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def audited(self, action: str, **match: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for row in self.audit(action):
                if all(row[k] == v for k, v in match.items()):
                    return row
            return None

        try:
            return wait_until(find, f"an audit_events row {action} {match}", timeout_s=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the {action} rows: {self.audit(action)}") from None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _count(prefix: str, where: str = "served = 1") -> str:
    return (
        f"SELECT count() FROM predictions FINAL WHERE pipeline = '{NAME}' "
        f"AND startsWith(event_id, '{prefix}') AND {where}"
    )


@pytest.fixture(scope="module")
def lab(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two workers over a logged pipeline, and a batch model v1 trained from what it logged
    (labels up to a cutoff only)."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    pipelines = pipeline_dir(tmp, "demo", NAME, _small_batch_model)
    base = worker_settings(stack_settings, tmp, pipelines, "grplife")
    settings = base.model_copy(
        update={
            "registry_dir": tmp / "registry",
            "reports_dir": tmp / "reports",
            "trainer_enabled": False,  # the test drives the lifecycle, not drift
        }
    )
    second = settings.model_copy(update={"web_port": free_port(), "state_dir": tmp / "second"})
    [spec] = load_pipelines(pipelines, [NAME])
    asyncio.run(ensure_pipeline_topics(settings, [spec]))
    sink = WorkerProcess(settings, [NAME], tmp / "sink.log")
    other = WorkerProcess(second, [NAME], tmp / "other.log", sink=False)  # one chDB owner
    sink.start()
    try:
        other.start()
        try:
            yield _train_from_the_log(settings, spec, sink, other)
        finally:
            other.stop()
    finally:
        sink.stop()


def _produce(
    settings: Settings, spec: PipelineSpec, examples: Iterable[Example], **options: Any
) -> int:
    return asyncio.run(produce_examples(settings, spec, examples, **options)).delivered


def _train_from_the_log(
    settings: Settings, spec: PipelineSpec, sink: WorkerProcess, other: WorkerProcess
) -> Lab:
    def split_settled() -> bool:
        held = [w.get("/health")["assigned_partitions"][NAME] for w in (sink, other)]
        return all(held) and sorted(held[0] + held[1]) == list(range(6))

    wait_until(split_settled, "both workers to hold partitions")  # no rebalance from here
    # one fraud pattern throughout (no concept drift), so a good model is a fair demand
    logged = list(payments(LOGGED_BEFORE_CUTOFF + LOGGED_AFTER_CUTOFF, seed=11, drift_at=2.0))
    before, after = logged[:LOGGED_BEFORE_CUTOFF], logged[LOGGED_BEFORE_CUTOFF:]
    labels = f"SELECT count() FROM labels FINAL WHERE pipeline = '{NAME}'"
    features = f"SELECT count() FROM features FINAL WHERE pipeline = '{NAME}'"
    _produce(settings, spec, before, label_delay=20)
    wait_for(sink, labels, LOGGED_BEFORE_CUTOFF)
    wait_for(sink, features, LOGGED_BEFORE_CUTOFF)
    wait_for(sink, _count("pay-11-"), LOGGED_BEFORE_CUTOFF)  # the online model's answers
    time.sleep(0.05)
    cutoff_ms = _now_ms()  # what the warehouse knew when training "started"
    time.sleep(0.05)
    _produce(settings, spec, after, label_delay=20)
    wait_for(sink, labels, LOGGED_BEFORE_CUTOFF + LOGGED_AFTER_CUTOFF)
    wait_for(sink, features, LOGGED_BEFORE_CUTOFF + LOGGED_AFTER_CUTOFF)
    outcome = lifecycle.train_and_register(
        settings, spec, Window(cutoff_ms=cutoff_ms), reason="integration test"
    )
    registry = Registry.from_settings(settings)
    return Lab(settings, spec, sink, other, registry, cutoff_ms, outcome, itertools.count(100))


# --- 1. train from what the pipeline logged ------------------------------------------------


def test_a_model_trained_from_the_logged_features_is_registered_and_shadows(lab: Lab) -> None:
    outcome, spec = lab.outcome, lab.spec
    v1 = lab.registry.get(NAME, "v1")

    # registered whole: checksum, feature list (as the ONNX file embeds it), training rows
    assert outcome.version.version == "v1"
    assert v1.sha256 == hashlib.sha256(v1.artifact.read_bytes()).hexdigest()
    assert v1.feature_names == json.loads(read_metadata(v1.artifact)["feature_names"])
    assert {"amount_log", "risk", "user_amount_1m_mean"} <= set(v1.feature_names)
    assert "amount_x_risk" not in v1.feature_names  # excluded by the spec
    assert (v1.spec_hash, v1.kind, v1.model_name) == (spec.spec_hash, "batch", "mlp")
    assert outcome.parity_max_diff < 1e-5
    assert v1.metadata["extra"]["parity_max_abs_diff"] == outcome.parity_max_diff

    # the evaluation report a person reads
    names = {p.name for p in outcome.report_dir.iterdir()}
    assert {"report.json", "summary.md", "loss_curves.png", "confusion_matrix.png"} <= names
    assert outcome.report_dir == lab.settings.reports_path / NAME / "v1"
    assert all(p.stat().st_size > 1000 for p in outcome.report_dir.glob("*.png"))
    report = json.loads((outcome.report_dir / "report.json").read_text())
    assert report["metrics"]["roc_auc"] > 0.75  # it learned the fraud pattern

    # point in time: labels the warehouse received after the cutoff were not used ...
    s = outcome.report.splits
    assert s.train.rows + s.validation.rows + s.test.rows == LOGGED_BEFORE_CUTOFF
    assert v1.training_window["rows"] == LOGGED_BEFORE_CUTOFF
    trained = lab.audited("trained")
    assert json.loads(trained["details"])["rows"] == LOGGED_BEFORE_CUTOFF
    # ... although they were there to use
    everything = lifecycle.read_training_rows(lab.settings, spec, Window(cutoff_ms=_now_ms()))
    assert len(everything) == LOGGED_BEFORE_CUTOFF + LOGGED_AFTER_CUTOFF

    # the audit trail and the registry mirror in ClickHouse
    assert lab.audited("evaluated", version="v1")["previous"] == lab.online
    lab.audited("registered", version="v1")
    deployed = {"challenger-shadow": "challenger_set", "archived": "archived"}
    assert outcome.deployed_as in deployed, outcome.deployed_as
    lab.audited(deployed[outcome.deployed_as], version="v1")
    mirrored = wait_until(
        lambda: lab.sink.query(
            "SELECT sha256, features, train_rows, stage FROM model_versions FINAL "
            f"WHERE pipeline = '{NAME}' AND version = 'v1'"
        )[1],
        "the model_versions row of v1",
    )
    assert mirrored == [[v1.sha256, v1.feature_names, LOGGED_BEFORE_CUTOFF, v1.stage]]

    # shadowing: v1 scores every new event beside the online champion, never answering
    if outcome.deployed_as == "archived":  # it did not beat the online model: shadow it anyway
        lifecycle.set_challenger(lab.settings, spec, "v1", "shadow", None, reason="test")
    shadow = {"kind": "batch", "version": "v1", "role": "shadow", "share": 0.0}
    wait_until(
        lambda: all(
            shadow in w.get("/stats")["pipelines"][NAME]["deployment"]["challengers"]
            for w in lab.workers
        ),
        "both workers to shadow v1",
    )
    prefix, events = lab.fresh(300)
    lab.produce(events, with_labels=False)
    shadowed = _count(prefix, "served = 0 AND role = 'shadow' AND model_version = 'v1'")
    assert wait_for(lab.sink, shadowed, 300) == 300
    assert {v for _, _, v in lab.all_served_once(prefix, 300)} == {lab.online}


# --- 2. hot swap under load ------------------------------------------------------------------


def test_promoting_under_load_serves_every_event_exactly_once(lab: Lab) -> None:
    assert [c["version"] for c in lab.champions()] == [lab.online, lab.online]
    n = 3000
    prefix, events = lab.fresh(n)
    handed = itertools.count()  # events handed to the producer so far (next() = count)

    def counted() -> Iterator[Example]:
        for event in events:
            next(handed)
            yield event

    failed: list[BaseException] = []

    def stream() -> None:
        try:
            lab.produce(counted(), rate=250, with_labels=False)
        except BaseException as exc:
            failed.append(exc)

    producer = threading.Thread(target=stream)
    producer.start()
    try:
        wait_for(lab.sink, _count(prefix), n // 4)
        before_promote = {e for e, _, _ in lab.served(prefix)}
        lifecycle.promote(lab.settings, lab.spec, "v1", reason="hot swap under load")
        lab.serving("v1")
        swapped_at = next(handed)  # events from here on reach workers that serve v1
    finally:
        producer.join(timeout=120)
    assert not producer.is_alive() and not failed, failed
    assert swapped_at < n - 250, "the swap finished after the stream: raise n or lower rate"

    rows = lab.all_served_once(prefix, n)  # none lost, none served twice

    version = {e: v for e, _, v in rows}
    assert {version[e] for e in before_promote} == {lab.online}
    late = [e for e in version if int(e.rsplit("-", 1)[1]) > swapped_at]
    assert late and {version[e] for e in late} == {"v1"}
    assert set(version.values()) == {lab.online, "v1"}
    # each entity's partition swapped once, between two batches: online ... then v1 ...
    by_entity: dict[str, list[tuple[int, str]]] = {}
    for e, key, v in rows:
        by_entity.setdefault(key, []).append((int(e.rsplit("-", 1)[1]), v))
    for key, served in by_entity.items():
        order = [v for _, v in sorted(served)]
        assert order == sorted(order, key=lambda v: v == "v1"), (key, order)
    # and the online model keeps learning as a shadow of the new champion
    learning = _count(prefix, f"served = 0 AND model_version = '{lab.online}'")
    assert wait_for(lab.sink, learning, n - swapped_at) >= n - swapped_at
    for worker in lab.workers:
        stats = worker.get("/stats")["pipelines"][NAME]
        online_shadow = {"kind": "online", "version": lab.online, "role": "shadow", "share": 0.0}
        assert stats["deployment"] == {
            "champion": {"kind": "batch", "version": "v1"},
            "challengers": [online_shadow],
        }
        assert stats["counters"].get("models_refused", 0) == 0
    assert lab.audited("promoted", version="v1")["previous"] == ""


# --- 3. rollback -----------------------------------------------------------------------------


def test_rolling_back_restores_the_previous_champion(lab: Lab) -> None:
    lab.ensure_champion("v1")

    now = lifecycle.rollback(lab.settings, lab.spec, reason="v1 misbehaves")

    assert now == lab.online  # v1 was the first batch champion: the online model is back
    lab.serving(lab.online)
    for worker in lab.workers:
        deployment = worker.get("/stats")["pipelines"][NAME]["deployment"]
        assert deployment == {"champion": {"kind": "online", "version": now}, "challengers": []}
    assert lab.registry.champion(NAME) is None
    assert lab.registry.get(NAME, "v1").stage == "archived"
    prefix, events = lab.fresh(300)
    lab.produce(events, with_labels=False)
    assert {v for _, _, v in lab.all_served_once(prefix, 300)} == {now}
    assert scalar(lab.sink, _count(prefix, "model_version = 'v1'")) == 0  # not even a shadow
    rolled = lab.audited("rolled_back", version=now)
    assert (rolled["previous"], rolled["reason"]) == ("v1", "v1 misbehaves")
    lab.audited("archived", version="v1", reason="rolled back: v1 misbehaves")


# --- 4. a corrupted artifact is refused ------------------------------------------------------


def test_a_corrupted_model_is_refused_and_the_champion_keeps_serving(lab: Lab) -> None:
    lab.ensure_champion("v1")
    refused_before = [
        w.get("/stats")["pipelines"][NAME]["counters"].get("models_refused", 0) for w in lab.workers
    ]
    v1 = lab.registry.get(NAME, "v1")
    v2 = lab.registry.register(  # a copy of v1 ...
        NAME,
        v1.artifact,
        kind="batch",
        model_name=v1.model_name,
        spec_hash=v1.spec_hash,
        feature_names=v1.feature_names,
        classes=v1.classes,
        task=v1.task,
        training_window=v1.training_window,
        metrics=v1.metrics,
        params={},
        parent_version="v1",
    )
    data = bytearray(v2.artifact.read_bytes())  # ... whose bytes then change on disk
    data[len(data) // 2] ^= 0xFF
    v2.artifact.write_bytes(bytes(data))

    # the CLI's promote checks the artifact first: refused, and nothing changes ...
    with pytest.raises(ArtifactIntegrityError, match="checksum mismatch"):
        lifecycle.promote(lab.settings, lab.spec, "v2", reason="corrupted on disk")
    assert lab.registry.champion(NAME).version == "v1"  # type: ignore[union-attr]
    # ... and a worker told to load it anyway (the registry changed by another tool)
    # refuses it too and keeps serving v1
    lab.registry.promote(NAME, "v2", reason="promoted behind the CLI's back")
    asyncio.run(control.publish(lab.settings, ControlEvent.new(NAME, "promoted", version="v2")))

    def refused() -> list[int] | None:
        counts = [
            w.get("/stats")["pipelines"][NAME]["counters"].get("models_refused", 0)
            for w in lab.workers
        ]
        return counts if all(a > b for a, b in zip(counts, refused_before, strict=True)) else None

    wait_until(refused, "both workers to refuse v2")
    assert [c["version"] for c in lab.champions()] == ["v1", "v1"]
    prefix, events = lab.fresh(300)
    lab.produce(events, with_labels=False)
    assert {v for _, _, v in lab.all_served_once(prefix, 300)} == {"v1"}
    assert scalar(lab.sink, _count(prefix, "model_version = 'v2'")) == 0
    # the audit trail says that a model was refused, why, and what kept serving ...
    refusal = lab.audited("model_refused")
    assert "checksum mismatch" in refusal["reason"] and "/v2/" in refusal["reason"]
    assert json.loads(refusal["details"])["serving"]["champion"]["version"] == "v1"
    # ... and which version it refused (the trail is queried by version)
    assert refusal["version"] == "v2", f"the refusal is recorded under {refusal['version']!r}"
