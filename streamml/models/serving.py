"""What serves a pipeline right now: a champion and its challengers, built from the registry.

The registry's stages decide for batch (ONNX) models; the online river model is always
there. Rules:

* a registered champion serves; without one, the online model does;
* registry challengers score the same events: ``shadow`` ones are logged, not served;
  a ``canary`` serves the entities whose stable bucket falls in its share;
* the online model, when it is not the champion, runs as a shadow (it learns anyway),
  unless the spec's ``serving`` names no online challenger and a batch model serves.

A batch model is loaded only after its checksum, spec hash and feature list verify
(:meth:`Registry.load_artifact`); :func:`plan` raises if one does not, and the caller
keeps its current deployment.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from streamml.errors import ArtifactIntegrityError, ModelError
from streamml.models.onnx_model import OnnxScorer, read_metadata
from streamml.models.registry import ModelVersion, Registry, pick_canary
from streamml.schemas.spec import PipelineSpec

ONLINE = "online"


@dataclass(frozen=True)
class Slot:
    """One model in the deployment: its role and, for batch models, a loaded scorer."""

    role: str  # champion | shadow | canary
    kind: str  # online | batch
    name: str
    version: str
    share: float = 0.0
    scorer: OnnxScorer | None = field(default=None, compare=False, repr=False)
    entry: ModelVersion | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Deployment:
    champion: Slot
    challengers: tuple[Slot, ...] = ()

    @property
    def batch_slots(self) -> list[Slot]:
        return [s for s in (self.champion, *self.challengers) if s.scorer is not None]

    @property
    def has_canary(self) -> bool:
        return any(s.role == "canary" for s in self.challengers)

    def canary_for(self, entity_key: str) -> Slot | None:
        """The canary that serves this entity, if any (stable per entity)."""
        canaries = [s for s in self.challengers if s.role == "canary" and s.entry is not None]
        if not canaries:
            return None
        picked = pick_canary(entity_key, [s.entry for s in canaries if s.entry is not None])
        return next((s for s in canaries if picked and s.version == picked.version), None)

    def describe(self) -> dict[str, Any]:
        return {
            "champion": {"kind": self.champion.kind, "version": self.champion.version},
            "challengers": [
                {"kind": s.kind, "version": s.version, "role": s.role, "share": s.share}
                for s in self.challengers
            ],
        }


def online_version(spec: PipelineSpec) -> str:
    return f"online-{spec.spec_hash[:8]}"


def load_scorer(registry: Registry, spec: PipelineSpec, entry: ModelVersion) -> OnnxScorer:
    """Verify a registered batch model, then load it for onnxruntime."""
    registry.load_artifact(
        spec.name,
        entry.version,
        expected_features=list(entry.feature_names),
        expected_spec_hash=spec.spec_hash,
    )
    try:
        embedded = json.loads(read_metadata(entry.artifact)["feature_names"])
    except (KeyError, ValueError, OSError) as exc:
        raise ArtifactIntegrityError(
            f"{spec.name} {entry.version}: the ONNX file carries no feature list ({exc})"
        ) from None
    if embedded != list(entry.feature_names):
        raise ArtifactIntegrityError(
            f"{spec.name} {entry.version}: the ONNX file's features differ from the registry's",
            hint="re-register the model from its training run",
        )
    threads = spec.batch_model.onnx.threads if spec.batch_model else 1
    try:
        return OnnxScorer(
            entry.artifact,
            entry.feature_names,
            list(entry.classes or []),
            entry.task,
            threads,
            positive=spec.label.positive,
        )
    except ModelError as exc:
        raise ArtifactIntegrityError(str(exc)) from None


def plan(spec: PipelineSpec, registry: Registry, current: Deployment | None = None) -> Deployment:
    """The deployment the registry describes now; scorers already loaded are reused."""
    loaded = {s.version: s.scorer for s in (current.batch_slots if current else [])}

    def scorer(entry: ModelVersion) -> OnnxScorer:
        have = loaded.get(entry.version)
        if have is not None:
            return have
        try:
            return load_scorer(registry, spec, entry)
        except ArtifactIntegrityError as exc:
            exc.version = entry.version  # which model was refused, for the audit trail
            raise

    online_name = spec.online_model.kind
    online = Slot("champion", ONLINE, online_name, online_version(spec))
    champion_entry = registry.champion(spec.name)
    challengers: list[Slot] = []
    if champion_entry is None:
        champion = online
    else:
        champion = Slot(
            "champion",
            "batch",
            champion_entry.model_name,
            champion_entry.version,
            scorer=scorer(champion_entry),
            entry=champion_entry,
        )
        if spec.serving.challenger == ONLINE or spec.serving.champion == ONLINE:
            challengers.append(Slot("shadow", ONLINE, online_name, online.version))
    for entry in _ordered(registry.challengers(spec.name)):
        role = "canary" if entry.mode == "canary" else "shadow"
        challengers.append(
            Slot(
                role,
                "batch",
                entry.model_name,
                entry.version,
                share=float(entry.share or 0.0),
                scorer=scorer(entry),
                entry=entry,
            )
        )
    return Deployment(champion, tuple(challengers))


def _ordered(entries: Sequence[ModelVersion]) -> list[ModelVersion]:
    return sorted(entries, key=lambda e: int(e.version.lstrip("v") or 0))
