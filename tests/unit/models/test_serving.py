"""Serving plans: who answers and who shadows, built from the registry; a model that does
not verify is never loaded; canary routing is stable per entity and close to its share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streamml.errors import ArtifactIntegrityError
from streamml.models.onnx_model import export_onnx
from streamml.models.registry import ModelVersion, Registry
from streamml.models.serving import ONLINE, Deployment, Slot, online_version, plan
from streamml.models.training import TrainResult, frame_from_rows, train
from streamml.schemas.operations import ServingSpec
from streamml.schemas.spec import PipelineSpec
from streamml.testing import temporary_registry
from tests.unit.models.test_training import make_rows, make_spec


@dataclass(frozen=True)
class Trained:
    spec: PipelineSpec
    result: TrainResult
    onnx: bytes


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A tiny MLP for pipeline ``t`` (x1, x2, one-hot merchant), exported to ONNX once."""
    spec = make_spec(epochs=3)
    result = train(spec, frame_from_rows(make_rows(160)))
    path = tmp_path_factory.mktemp("serving") / "model.onnx"
    export_onnx(result, path)
    return Trained(spec, result, path.read_bytes())


@pytest.fixture
def reg() -> Iterator[Registry]:
    with temporary_registry() as registry:
        yield registry


def _register(
    reg: Registry, t: Trained, *, features: list[str] | None = None, onnx: bytes | None = None
) -> ModelVersion:
    """Register the tiny model as lifecycle.train_and_register would."""
    return reg.register(
        t.spec.name,
        t.onnx if onnx is None else onnx,
        kind="batch",
        model_name="mlp",
        spec_hash=t.spec.spec_hash,
        feature_names=list(t.result.feature_names) if features is None else features,
        classes=[str(c) for c in t.result.classes],
        task=t.spec.task,
        training_window={"start": 0, "end": 60_000, "rows": 160},
        metrics={"roc_auc": 0.9},
        params={},
        parent_version=None,
        artifact_name="model.onnx",
    )


def _serving(spec: PipelineSpec, **roles: str) -> PipelineSpec:
    """The spec with other serving roles (serving is not part of the spec hash)."""
    changed = spec.model_copy(update={"serving": ServingSpec(**roles)})  # type: ignore[arg-type]
    assert changed.spec_hash == spec.spec_hash
    return changed


def _roles(deployment: Deployment) -> list[tuple[str, str, str]]:
    slots = (deployment.champion, *deployment.challengers)
    return [(s.role, s.kind, s.version) for s in slots]


# --- who serves ------------------------------------------------------------------------


def test_without_a_champion_the_online_model_serves_alone(reg: Registry, trained: Trained) -> None:
    spec = trained.spec
    _register(reg, trained)  # registered, never deployed: it changes nothing

    deployment = plan(spec, reg)

    assert _roles(deployment) == [("champion", ONLINE, online_version(spec))]
    assert deployment.champion.name == spec.online_model.kind
    assert deployment.batch_slots == []
    assert deployment.describe() == {
        "champion": {"kind": ONLINE, "version": online_version(spec)},
        "challengers": [],
    }


def test_a_registered_champion_serves_and_the_online_model_shadows_it(
    reg: Registry, trained: Trained
) -> None:
    spec = trained.spec  # serving: champion online (until a batch champion exists)
    _register(reg, trained)
    reg.promote(spec.name, "v1")

    deployment = plan(spec, reg)

    assert _roles(deployment) == [
        ("champion", "batch", "v1"),
        ("shadow", ONLINE, online_version(spec)),
    ]
    champion = deployment.champion
    assert champion.scorer is not None and champion.entry is not None
    assert champion.name == "mlp" and champion.entry.stage == "champion"
    [answer] = champion.scorer.predict_many([{"x1": 2.0, "x2": 2.0, "merchant=m0": 1.0}])
    assert answer.predicted_class == "True"  # the tiny model learned x1 + x2 > 0
    assert deployment.batch_slots == [champion]


def test_the_spec_decides_whether_the_online_model_shadows_a_batch_champion(
    reg: Registry, trained: Trained
) -> None:
    _register(reg, trained)
    reg.promote(trained.spec.name, "v1")
    online = online_version(trained.spec)

    batch_alone = plan(_serving(trained.spec, champion="batch"), reg)
    online_challenger = plan(_serving(trained.spec, champion="batch", challenger="online"), reg)

    assert _roles(batch_alone) == [("champion", "batch", "v1")]
    assert _roles(online_challenger) == [("champion", "batch", "v1"), ("shadow", ONLINE, online)]


def test_shadow_and_canary_challengers_are_planned_in_version_order(
    reg: Registry, trained: Trained
) -> None:
    spec, name = trained.spec, trained.spec.name
    for _ in range(3):
        _register(reg, trained)
    reg.set_challenger(name, "v3", "canary", 0.2)
    reg.set_challenger(name, "v2", "shadow")

    deployment = plan(spec, reg)

    assert _roles(deployment) == [
        ("champion", ONLINE, online_version(spec)),
        ("shadow", "batch", "v2"),
        ("canary", "batch", "v3"),
    ]
    shadow, canary = deployment.challengers
    assert (shadow.share, canary.share) == (0.0, 0.2)
    assert all(s.scorer is not None for s in deployment.challengers)
    assert deployment.describe()["challengers"][1] == {
        "kind": "batch",
        "version": "v3",
        "role": "canary",
        "share": 0.2,
    }


def test_a_new_plan_reuses_the_scorers_already_loaded(reg: Registry, trained: Trained) -> None:
    spec = trained.spec
    _register(reg, trained)
    _register(reg, trained)
    reg.set_challenger(spec.name, "v1", "shadow")
    first = plan(spec, reg)
    reg.set_challenger(spec.name, "v2", "shadow")

    second = plan(spec, reg, first)

    assert [s.version for s in second.batch_slots] == ["v1", "v2"]
    assert second.batch_slots[0].scorer is first.batch_slots[0].scorer
    assert second != first


# --- a model that does not verify is not loaded --------------------------------------


def test_a_tampered_artifact_is_refused(reg: Registry, trained: Trained) -> None:
    entry = _register(reg, trained)
    reg.promote(trained.spec.name, "v1")
    data = bytearray(entry.artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.artifact.write_bytes(bytes(data))

    with pytest.raises(ArtifactIntegrityError, match="checksum mismatch"):
        plan(trained.spec, reg)


def test_a_tampered_challenger_is_refused_too(reg: Registry, trained: Trained) -> None:
    entry = _register(reg, trained)
    reg.set_challenger(trained.spec.name, "v1", "shadow")
    Path(entry.artifact).write_bytes(b"not an onnx model")

    with pytest.raises(ArtifactIntegrityError, match="checksum mismatch"):
        plan(trained.spec, reg)


def test_a_feature_list_that_differs_from_the_onnx_file_is_refused(
    reg: Registry, trained: Trained
) -> None:
    features = list(reversed(trained.result.feature_names))  # same names, wrong order
    _register(reg, trained, features=features)
    reg.promote(trained.spec.name, "v1")

    with pytest.raises(ArtifactIntegrityError, match="features differ"):
        plan(trained.spec, reg)


def test_a_model_trained_for_another_spec_is_refused(reg: Registry, trained: Trained) -> None:
    _register(reg, trained)
    reg.promote(trained.spec.name, "v1")
    other = make_spec(epochs=3, seed=1).model_copy(update={"description": "changed contract"})
    assert other.spec_hash != trained.spec.spec_hash

    with pytest.raises(ArtifactIntegrityError, match="trained for spec"):
        plan(other, reg)


# --- canary routing --------------------------------------------------------------------


def _with_canary(reg: Registry, trained: Trained, share: float) -> Deployment:
    _register(reg, trained)
    reg.set_challenger(trained.spec.name, "v1", "canary", share)
    return plan(trained.spec, reg)


def test_canary_routing_is_stable_per_entity_and_matches_its_share(
    reg: Registry, trained: Trained
) -> None:
    deployment = _with_canary(reg, trained, 0.25)
    keys = [f"user-{i}" for i in range(4000)]

    routed = [deployment.canary_for(k) for k in keys]
    replanned = plan(trained.spec, reg)  # another worker, or after a restart

    assert {s.version for s in routed if s is not None} == {"v1"}
    assert all(s is None or s.role == "canary" for s in routed)
    share = sum(s is not None for s in routed) / len(keys)
    assert 0.22 <= share <= 0.28, share
    assert [deployment.canary_for(k) for k in keys] == routed
    assert [replanned.canary_for(k) for k in keys] == routed


def test_a_larger_canary_share_keeps_the_entities_it_had(reg: Registry, trained: Trained) -> None:
    small = _with_canary(reg, trained, 0.1)
    reg.set_challenger(trained.spec.name, "v1", "canary", 0.3)
    large = plan(trained.spec, reg, small)
    keys = [f"card-{i}" for i in range(3000)]

    had = {k for k in keys if small.canary_for(k) is not None}
    has = {k for k in keys if large.canary_for(k) is not None}

    assert had < has
    assert 0.26 <= len(has) / len(keys) <= 0.34


def test_without_a_canary_no_entity_is_routed(reg: Registry, trained: Trained) -> None:
    _register(reg, trained)
    reg.set_challenger(trained.spec.name, "v1", "shadow")
    deployment = plan(trained.spec, reg)
    online_only = Deployment(Slot("champion", ONLINE, "logistic_regression", "online-x"))

    assert all(deployment.canary_for(f"u{i}") is None for i in range(200))
    assert online_only.canary_for("u1") is None
