"""Signed models on the real broker and chDB: a worker serves a signed champion, and an
unsigned artifact or one signed with another key is refused -- by ``streamml models promote``
before any stage changes, and by the worker when the registry is changed behind the CLI's
back -- which publishes ``model_refused`` and keeps serving the old champion.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamml import lifecycle
from streamml.config import Settings
from streamml.devstack.worker import WorkerProcess
from streamml.errors import ArtifactIntegrityError
from streamml.models.onnx_model import export_onnx
from streamml.models.registry import ModelVersion, Registry, key_id
from streamml.models.training import frame_from_rows, train
from streamml.schemas.catalog import load_pipelines
from streamml.schemas.control import ControlEvent
from streamml.schemas.spec import PipelineSpec
from streamml.streams import control
from streamml.streams.kafka import ensure_pipeline_topics

from .helpers import pipeline_dir, run_cli, wait_until, worker_settings

NAME = "signed"
OTHER_KEY = b"a key this deployment never gave out"


def _tiny_batch_model(spec: dict[str, Any]) -> None:
    spec["batch_model"].pop("search")
    spec["batch_model"].update(epochs=2, cv_folds=2, min_steps=1)
    spec["retrain"]["on_drift"] = False


@dataclass
class Lab:
    settings: Settings
    spec: PipelineSpec
    worker: WorkerProcess
    registry: Registry  # the deployment's: signs with the key every process here shares
    onnx: Path

    def register(self, registry: Registry | None = None) -> ModelVersion:
        return (registry or self.registry).register(
            NAME,
            self.onnx,
            kind="batch",
            model_name="mlp",
            spec_hash=self.spec.spec_hash,
            feature_names=["amount_log", "risk"],
            classes=["False", "True"],
            task=self.spec.task,
            training_window={"start": 0, "end": 300_000, "rows": 300},
            metrics={},
            params={},
            parent_version=None,
        )

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.worker.get("/stats")["pipelines"][NAME]
        return stats

    def champion(self) -> str:
        return str(self.stats()["deployment"]["champion"]["version"])

    def promote_behind_the_clis_back(self, version: str) -> ControlEvent:
        """Make ``version`` the champion in the registry, tell the workers, and return the
        ``model_refused`` event a worker publishes for it."""
        self.registry.promote(NAME, version, reason="promoted behind the CLI's back")
        return asyncio.run(self._publish_and_await_refusal(version))

    async def _publish_and_await_refusal(self, version: str) -> ControlEvent:
        ready = asyncio.Event()

        async def refusal() -> ControlEvent:
            async for event in control.follow(self.settings, ready):
                if (event.pipeline, event.action, event.version) == (
                    NAME,
                    "model_refused",
                    version,
                ):
                    return event
            raise AssertionError("the control topic ended")

        watch = asyncio.create_task(refusal())
        await asyncio.wait_for(ready.wait(), 30)
        await control.publish(self.settings, ControlEvent.new(NAME, "promoted", version=version))
        try:
            return await asyncio.wait_for(watch, 60)
        except TimeoutError:
            raise AssertionError(
                f"no model_refused for {version}\n{self.worker.log_tail()}"
            ) from None


def _train_onnx(spec: PipelineSpec, path: Path) -> None:
    """A small MLP over two of the pipeline's features (what it learns does not matter)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(300):
        amount, risk = float(rng.gamma(2.0, 30.0)), float(rng.random())
        features = {"amount_log": float(np.log1p(amount)), "risk": risk}
        rows.append((f"e{i}", 1_000 * i, features, risk > 0.7))
    export_onnx(train(spec, frame_from_rows(rows)), path)


@pytest.fixture(scope="module")
def lab(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One worker serving a signed batch champion v1."""
    tmp = tmp_path_factory.mktemp("signed")
    pipelines = pipeline_dir(tmp, "demo", NAME, _tiny_batch_model)
    settings = worker_settings(stack_settings, tmp, pipelines, "grpsigned").model_copy(
        update={
            "registry_dir": tmp / "registry",
            "reports_dir": tmp / "reports",
            "trainer_enabled": False,
        }
    )
    [spec] = load_pipelines(pipelines, [NAME])
    asyncio.run(ensure_pipeline_topics(settings, [spec]))
    _train_onnx(spec, tmp / "model.onnx")
    worker = WorkerProcess(settings, [NAME], tmp / "worker.log")
    worker.start()
    try:
        lab = Lab(settings, spec, worker, Registry.from_settings(settings), tmp / "model.onnx")
        v1 = lab.register()
        lifecycle.promote(settings, spec, v1.version, reason="a signed model")
        wait_until(lambda: lab.champion() == "v1", "the worker to serve the signed v1")
        yield lab
    finally:
        worker.stop()
        print(f"\nworker log: {worker.log_file}")


def _unsigned(lab: Lab) -> ModelVersion:
    """A version whose signature was taken out of meta.json (an artifact copied in by hand,
    or registered before models were signed)."""
    mv = lab.register()
    meta_file = mv.artifact.parent / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["signature"]
    meta_file.write_text(json.dumps(meta))
    return mv


def _foreign(lab: Lab) -> ModelVersion:
    """A version registered, into the same registry, by a process with another key."""
    return lab.register(Registry(lab.registry.root, signing_key=OTHER_KEY))


def test_a_signed_champion_serves(lab: Lab) -> None:
    v1 = lab.registry.get(NAME, "v1")
    assert v1.metadata["signature"]["key_id"] == lab.registry.key_id
    assert lab.stats()["deployment"]["champion"]["kind"] == "batch"


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_unsigned, "the artifact is unsigned"),
        (_foreign, "signed with another key (key id {other}, this worker's {ours})"),
    ],
    ids=["unsigned", "other-key"],
)
def test_a_model_without_our_signature_is_refused_and_the_champion_keeps_serving(
    lab: Lab, make: Any, why: str
) -> None:
    why = why.format(other=key_id(OTHER_KEY), ours=lab.registry.key_id)
    bad = make(lab)
    where = f"{NAME} {bad.version}"

    # the CLI refuses it before any stage changes ...
    result = run_cli("models", "promote", NAME, bad.version, settings=lab.settings)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{where}: {why}" in " ".join(result.stderr.split())
    assert lab.registry.get(NAME, bad.version).stage == "registered"
    with pytest.raises(ArtifactIntegrityError, match=r"unsigned|another key"):
        lifecycle.set_challenger(lab.settings, lab.spec, bad.version, "shadow", None, "test")
    assert lab.registry.champion(NAME).version == "v1"  # type: ignore[union-attr]

    # ... and a worker told to serve it anyway refuses it, says so and keeps serving v1
    refused_before = lab.stats()["counters"].get("models_refused", 0)
    try:
        refusal = lab.promote_behind_the_clis_back(bad.version)
        assert f"{where}: {why}" in refusal.reason
        assert refusal.details["serving"]["champion"]["version"] == "v1"
        assert lab.stats()["counters"]["models_refused"] > refused_before
        assert lab.champion() == "v1"
    finally:  # put the signed champion back in the registry for the next case
        lab.registry.rollback(NAME, reason="test cleanup")
    assert lab.registry.champion(NAME).version == "v1"  # type: ignore[union-attr]
