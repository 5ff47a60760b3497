"""Versioned model registry on disk: ``root/<pipeline>/<version>/{<artifact>, meta.json}``
and ``root/<pipeline>/stages.json`` (champion, challengers, history).

A version directory is built aside and renamed in, so it appears whole or not at all; files are
written atomically; changes hold a per-pipeline ``fcntl`` lock, so processes never share a
version. Callers mirror :meth:`ModelVersion.to_row` into ClickHouse ``model_versions``.

Every version is signed at registration: an HMAC-SHA256, under the key the registry is given
(``streamml.secrets.model_signing_key``), of a message binding the artifact's sha256 to the
pipeline, version and metadata it is served with (:func:`signing_message`). The signature is
checked with the checksum before an artifact is loaded, so an unsigned artifact, one signed
with another key, or one whose metadata was edited is refused.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamml.errors import ArtifactIntegrityError, RegistryError
from streamml.secrets import model_signing_key

if TYPE_CHECKING:
    from streamml.config import Settings

KINDS = ("batch", "online")
MODES = ("shadow", "canary")
STAGES = ("registered", "challenger", "champion", "archived")
META_FILE = "meta.json"
STAGES_FILE = "stages.json"
# meta.json keys copied as they are into ModelVersion fields of the same name
_META_FIELDS = ("model_name", "spec_hash", "feature_names", "classes", "task", "metrics",
                "parent_version")  # fmt: skip
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_VERSION = re.compile(r"^v([1-9][0-9]*)$")
SIGNATURE_ALGORITHM = "hmac-sha256"
# meta.json keys a signature binds: the artifact's bytes (through sha256) to where and how
# they are served; a signature moved to another version or edited metadata no longer matches
SIGNED_FIELDS = ("pipeline", "version", "kind", "sha256", "spec_hash", "feature_names",
                 "classes", "task")  # fmt: skip
_SIGNATURE_DOMAIN = b"streamml-model-signature/1\n"


def key_id(key: bytes) -> str:
    """A short public name of a signing key: the first 8 hex digits of its sha256.

    >>> key_id(b"k1"), key_id(b"k2")
    ('6ab9f1eb', '015f7e6b')
    """
    return hashlib.sha256(key).hexdigest()[:8]


def signing_message(meta: Mapping[str, Any]) -> bytes:
    """The canonical bytes a version's signature covers: the :data:`SIGNED_FIELDS` of its
    metadata as compact JSON with sorted keys, after a fixed domain prefix.

    >>> print(signing_message({"pipeline": "p", "version": "v1", "sha256": "ab"}).decode())
    ... # doctest: +ELLIPSIS
    streamml-model-signature/1
    {"classes":null,"feature_names":null,"kind":null,"pipeline":"p","sha256":"ab",...}
    """
    signed = {name: meta.get(name) for name in SIGNED_FIELDS}
    return _SIGNATURE_DOMAIN + json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()


def sign(meta: Mapping[str, Any], key: bytes) -> dict[str, str]:
    """The signature of a version's metadata, as stored under ``meta["signature"]``.

    >>> meta = {"pipeline": "p", "version": "v1", "sha256": "ab", "feature_names": ["x"]}
    >>> sig = sign(meta, b"k1")
    >>> sig["algorithm"], sig["key_id"], len(sig["hmac"])
    ('hmac-sha256', '6ab9f1eb', 64)
    >>> verify(meta | {"signature": sig}, b"k1", "p v1")
    >>> verify(meta | {"signature": sig, "version": "v2"}, b"k1", "p v2")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streamml.errors.ArtifactIntegrityError: p v2: signature does not match its metadata ...
    """
    mac = hmac.new(key, signing_message(meta), hashlib.sha256).hexdigest()
    return {"algorithm": SIGNATURE_ALGORITHM, "key_id": key_id(key), "hmac": mac}


def verify(meta: Mapping[str, Any], key: bytes, where: str) -> None:
    """Raise :class:`ArtifactIntegrityError` unless ``meta`` carries a signature by ``key``
    over its own signed fields (``where`` names the version in the message).

    >>> verify({"version": "v1"}, b"k1", "p v1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streamml.errors.ArtifactIntegrityError: p v1: the artifact is unsigned...
    >>> verify({"signature": sign({}, b"k2")}, b"k1", "p v1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streamml.errors.ArtifactIntegrityError: p v1: signed with another key (key id 015f7e6b, ...
    """
    signature = meta.get("signature")
    if not isinstance(signature, Mapping) or not signature.get("hmac"):
        raise ArtifactIntegrityError(
            f"{where}: the artifact is unsigned; only models signed at registration are loaded",
            hint="register it again through streamml (it signs with the model signing key)",
        )
    if signature.get("algorithm") != SIGNATURE_ALGORITHM:
        raise ArtifactIntegrityError(
            f"{where}: signature algorithm {signature.get('algorithm')!r} is not supported",
            hint=f"register it again (signs with {SIGNATURE_ALGORITHM})",
        )
    if (signer := str(signature.get("key_id"))) != (mine := key_id(key)):
        raise ArtifactIntegrityError(
            f"{where}: signed with another key (key id {signer}, this worker's {mine})",
            hint="give every worker and the CLI the same STREAMML_MODEL_SIGNING_KEY(_FILE)",
        )
    expected = sign(meta, key)["hmac"]
    if not hmac.compare_digest(str(signature["hmac"]), expected):
        raise ArtifactIntegrityError(
            f"{where}: signature does not match its metadata (key id {mine}); "
            "meta.json was changed after registration",
            hint="register the model again",
        )


def canary_bucket(entity_key: str) -> float:
    """A number in [0, 1) fixed by the key alone: the same in every process and every run.

    >>> round(canary_bucket("user-42"), 6)
    0.436047
    """
    digest = hashlib.blake2b(entity_key.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)  # 53 bits: exact, never 1.0


def routes_to_canary(entity_key: str, share: float) -> bool:
    """True when the entity goes to a canary serving ``share`` of the keys; a key keeps its
    answer, and a larger share only adds keys.

    >>> [routes_to_canary("user-42", s) for s in (0.25, 0.5)], sum(
    ...     routes_to_canary(f"user-{i}", 0.1) for i in range(10_000))
    ([False, True], 1014)
    """
    return canary_bucket(entity_key) < share


def pick_canary(entity_key: str, challengers: Sequence[ModelVersion]) -> ModelVersion | None:
    """The canary serving this key, if any; several canaries get disjoint bucket ranges."""
    bucket, edge = canary_bucket(entity_key), 0.0
    for mv in sorted(challengers, key=lambda m: _number(m.version)):
        if mv.mode == "canary" and mv.share:
            edge += mv.share
            if bucket < edge:
                return mv
    return None


@dataclass(frozen=True)
class ModelVersion:
    """One registered version and its stage when read (a snapshot: read again to refresh)."""

    pipeline: str
    version: str
    kind: str  # "batch" or "online"
    stage: str  # one of STAGES
    mode: str | None  # "shadow" or "canary" for a challenger, else None
    share: float | None  # the canary share, else None
    traffic_share: float  # share of keys it serves: champion 1 - canaries, canary its share
    sha256: str
    artifact: Path
    created_at: dt.datetime
    updated_at: dt.datetime  # the pipeline's latest stage change
    model_name: str
    spec_hash: str
    feature_names: list[str]
    classes: list[str] | None
    task: str
    metrics: dict[str, float]
    parent_version: str | None
    training_window: dict[str, Any]  # start/end as UTC ISO text, rows
    metadata: dict[str, Any]  # the whole meta.json (params, extra, size_bytes, ...)

    def to_row(self) -> dict[str, Any]:
        """A row of the ClickHouse ``model_versions`` table: exactly its columns, in order."""
        start, end = self.training_window.get("start"), self.training_window.get("end")
        return {
            "pipeline": self.pipeline,
            "model_name": self.model_name,
            "version": self.version,
            "stage": self.stage,
            "kind": self.kind,
            "artifact_uri": self.artifact.as_uri(),
            "sha256": self.sha256,
            "spec_hash": self.spec_hash,
            "features": list(self.feature_names),
            "train_start": _to_utc(start) if start else None,
            "train_end": _to_utc(end) if end else None,
            "metrics": dict(self.metrics),
            "parent_version": self.parent_version or "",
            "traffic_share": self.traffic_share,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    def extra_columns(self) -> dict[str, Any]:
        """Fields ``model_versions`` has no column for yet (for a later migration)."""
        return {
            "mode": self.mode or "",
            "task": self.task,
            "classes": list(self.classes or []),
            "train_rows": int(self.training_window.get("rows") or 0),
            "params": json.dumps(self.metadata.get("params") or {}, sort_keys=True),
        }


class Registry:
    """Model versions of every pipeline under one directory (e.g. ``<state_dir>/models``)."""

    def __init__(self, root: Path, *, signing_key: bytes | None = None) -> None:
        """``signing_key`` signs new versions and verifies artifacts before they are loaded;
        without one the registry can list and change stages, but not register or load."""
        self.root = Path(root).expanduser().resolve()
        self._signing_key = signing_key or None

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """The registry at ``settings.registry_path`` with the model signing key of
        ``settings`` (``STREAMML_MODEL_SIGNING_KEY``/``_FILE``, else the generated one)."""
        return cls(settings.registry_path, signing_key=model_signing_key(settings))

    @property
    def key_id(self) -> str | None:
        """The public id of this registry's signing key (None: it has none)."""
        return None if self._signing_key is None else key_id(self._signing_key)

    def _key(self, error: type[RegistryError], what: str) -> bytes:
        if self._signing_key is None:
            raise error(
                f"cannot {what}: this registry has no model signing key",
                hint="construct it as Registry(path, signing_key=model_signing_key(settings))",
            )
        return self._signing_key

    def register(
        self,
        pipeline: str,
        artifact: Path | bytes,
        *,
        kind: str,
        spec_hash: str,
        feature_names: list[str],
        classes: list[str] | None,
        task: str,
        training_window: dict[str, Any],
        metrics: dict[str, float],
        params: dict[str, Any],
        parent_version: str | None,
        extra: dict[str, Any] | None = None,
        model_name: str | None = None,
        artifact_name: str | None = None,
    ) -> ModelVersion:
        """Copy the artifact in as the next version (stage "registered"), signed with the
        registry's key, and return it."""
        key = self._key(RegistryError, f"register a {pipeline} model")
        if kind not in KINDS:
            raise RegistryError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if len(set(feature_names)) != len(feature_names):
            raise RegistryError(f"feature_names has duplicates: {feature_names}")
        if bad := [k for k, v in metrics.items() if not math.isfinite(float(v))]:
            raise RegistryError(f"metric {bad[0]!r} is not a finite number", hint="drop it")
        if isinstance(artifact, bytes):
            data, name = artifact, artifact_name or "model.bin"
        else:
            name = artifact_name or artifact.name
            try:
                data = artifact.read_bytes()
            except OSError as exc:
                raise RegistryError(f"cannot read artifact {artifact}: {exc.strerror}") from exc
        if not _SAFE_NAME.match(name) or name in (META_FILE, STAGES_FILE):
            raise RegistryError(f"artifact file name {name!r} is not allowed")
        meta: dict[str, Any] = {
            "format": 1, "pipeline": pipeline, "kind": kind, "model_name": model_name or kind,
            "artifact": name, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data),
            "spec_hash": spec_hash, "feature_names": list(feature_names), "task": task,
            "classes": None if classes is None else list(classes),
            "training_window": _window(training_window),
            "metrics": {str(k): float(v) for k, v in metrics.items()}, "params": params,
            "parent_version": parent_version, "extra": extra or {},
        }  # fmt: skip
        _dumps(meta)  # refuse params/extra that are not plain JSON before taking a number
        with self._edit(pipeline) as (pdir, state):
            if parent_version is not None:
                self._require(pdir, pipeline, parent_version)
            number = max([state["last_version"], *_numbers(pdir)]) + 1
            version = meta["version"] = f"v{number}"
            meta["created_at"] = _now()
            meta["signature"] = sign(meta, key)
            for stale in pdir.glob(".staging-*"):  # left by a crash (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=pdir))
            try:
                _atomic_write(staging / name, data)
                _atomic_write(staging / META_FILE, _dumps(meta))
                os.rename(staging, pdir / version)
                _fsync_dir(pdir)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise RegistryError(f"could not write {pdir / version}: {exc}") from exc
            state["last_version"] = number
            _commit(pdir, state, "register", version, None, None)
            return self._load(pdir, pipeline, version, state)

    def set_challenger(
        self,
        pipeline: str,
        version: str,
        mode: str,
        share: float | None = None,
        *,
        reason: str | None = None,
    ) -> ModelVersion:
        """Make a version a challenger: "shadow" (scored, never served) or "canary" (serves
        ``share`` of the entity keys); calling it again changes mode or share."""
        if mode not in MODES:
            raise RegistryError(f"challenger mode must be shadow or canary, got {mode!r}")
        if mode == "canary" and (share is None or not 0.0 < share < 1.0):
            hint = "e.g. share=0.1 serves 10% of entity keys from the canary"
            raise RegistryError(f"a canary needs a share in (0, 1), got {share!r}", hint=hint)
        if mode == "shadow" and share is not None:
            raise RegistryError("a shadow challenger serves no traffic", hint="drop share")
        with self._edit(pipeline) as (pdir, state):
            self._require(pdir, pipeline, version)
            if state["champion"] == version:
                raise RegistryError(
                    f"{pipeline} {version} is the champion; it cannot also be a challenger",
                    hint="promote another version or roll back first",
                )
            total = (share or 0.0) + _canary_total(state, but=version)
            if total >= 1.0:
                msg = f"canary shares would total {total:.3g}; the champion must keep some traffic"
                raise RegistryError(msg, hint="lower the share or archive another canary")
            from_stage = _move(state, version, "challenger", {"mode": mode, "share": share})
            _commit(pdir, state, "challenger", version, from_stage, reason, mode=mode, share=share)
            return self._load(pdir, pipeline, version, state)

    def promote(
        self, pipeline: str, version: str | None = None, *, reason: str | None = None
    ) -> ModelVersion:
        """Make ``version`` (default: the only challenger) the champion; the champion it
        replaces is archived and becomes the rollback target."""
        with self._edit(pipeline) as (pdir, state):
            if version is None:
                names = sorted(state["challengers"], key=_number)
                if len(names) != 1:
                    found = f"challengers {', '.join(names)}" if names else "no challenger"
                    hint = "pass version=, or set_challenger() first"
                    raise RegistryError(f"{pipeline} has {found}: which to promote?", hint=hint)
                version = names[0]
            self._require(pdir, pipeline, version)
            previous = state["champion"]
            if previous == version:
                raise RegistryError(f"{pipeline} {version} is already the champion")
            from_stage = _move(state, version, "champion")
            _discard(state["rollback"], version)
            if previous is not None:
                _move(state, previous, "archived")
                state["rollback"].append(previous)
            _commit(pdir, state, "promote", version, from_stage, reason, previous=previous)
            return self._load(pdir, pipeline, version, state)

    def rollback(self, pipeline: str, *, reason: str | None = None) -> ModelVersion:
        """Bring back the previous champion and archive the current one; return the champion."""
        with self._edit(pipeline) as (pdir, state):
            current = state["champion"]
            if current is None or not state["rollback"]:
                why = f"{current} is its first champion" if current else "it has no champion"
                raise RegistryError(
                    f"{pipeline} has no previous champion to roll back to ({why})",
                    hint="promote a version instead: promote(pipeline, version)",
                )
            target = state["rollback"].pop()
            from_stage = _move(state, target, "champion")
            _move(state, current, "archived")
            _commit(pdir, state, "rollback", target, from_stage, reason, previous=current)
            return self._load(pdir, pipeline, target, state)

    def retire_champion(self, pipeline: str, *, reason: str | None = None) -> ModelVersion:
        """Archive the champion and leave none (the pipeline's online model serves again);
        return the retired version."""
        with self._edit(pipeline) as (pdir, state):
            current = state["champion"]
            if current is None:
                raise RegistryError(f"{pipeline} has no champion to retire")
            _move(state, current, "archived")
            state["champion"] = None
            _commit(pdir, state, "retire", current, "champion", reason)
            return self._load(pdir, pipeline, current, state)

    def can_roll_back(self, pipeline: str) -> bool:
        """Is there an earlier batch champion to bring back?"""
        return bool(self._read(pipeline)[1]["rollback"])

    def archive(self, pipeline: str, version: str, *, reason: str | None = None) -> ModelVersion:
        """Retire a version (a challenger stops being one); archiving twice changes nothing."""
        with self._edit(pipeline) as (pdir, state):
            self._require(pdir, pipeline, version)
            if state["champion"] == version:
                raise RegistryError(
                    f"{pipeline} {version} is the champion and cannot be archived",
                    hint="promote another version or roll back first",
                )
            if (from_stage := _move(state, version, "archived")) != "archived":
                _commit(pdir, state, "archive", version, from_stage, reason)
            return self._load(pdir, pipeline, version, state)

    def pipelines(self) -> builtins.list[str]:
        """Names of the pipelines with at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _numbers(p))

    def list(self, pipeline: str) -> builtins.list[ModelVersion]:
        """Every complete version of a pipeline, oldest first, with its current stage."""
        pdir, state = self._read(pipeline)
        complete = [n for n in sorted(_numbers(pdir)) if (pdir / f"v{n}" / META_FILE).is_file()]
        return [self._load(pdir, pipeline, f"v{n}", state) for n in complete]

    def get(self, pipeline: str, version: str) -> ModelVersion:
        pdir, state = self._read(pipeline)
        self._require(pdir, pipeline, version)
        return self._load(pdir, pipeline, version, state)

    def champion(self, pipeline: str) -> ModelVersion | None:
        pdir, state = self._read(pipeline)
        name = state["champion"]
        return None if name is None else self._load(pdir, pipeline, name, state)

    def challengers(self, pipeline: str) -> builtins.list[ModelVersion]:
        pdir, state = self._read(pipeline)
        names = sorted(state["challengers"], key=_number)
        return [self._load(pdir, pipeline, v, state) for v in names]

    def history(self, pipeline: str) -> builtins.list[dict[str, Any]]:
        """Stage changes, oldest first: {at, action, version, previous (the champion before),
        reason, from_stage} plus mode/share for a challenger."""
        return [dict(e) for e in self._read(pipeline)[1]["history"]]

    def load_artifact(
        self,
        pipeline: str,
        version: str,
        *,
        expected_features: Sequence[str] | None = None,
        expected_spec_hash: str | None = None,
    ) -> bytes:
        """The artifact bytes, once its signature, sha256, spec hash and feature list are
        checked."""
        vdir, where = self._pdir(pipeline) / version, f"{pipeline} {version}"
        meta = _read_meta(vdir / META_FILE) if _VERSION.match(version) else None
        if meta is None:
            raise ArtifactIntegrityError(f"{where}: {vdir / META_FILE} is missing")
        key = self._key(ArtifactIntegrityError, f"verify {where}")
        # signed for the place it is loaded from: a version copied to another number fails
        verify(meta | {"pipeline": pipeline, "version": version}, key, where)
        path = vdir / str(meta["artifact"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactIntegrityError(f"{where}: cannot read {path}: {exc.strerror}") from exc
        if (actual := hashlib.sha256(data).hexdigest()) != meta["sha256"]:
            raise ArtifactIntegrityError(
                f"checksum mismatch for {path}: meta.json has {meta['sha256']}, file has {actual}",
                hint="the artifact changed after registration; register it again",
            )
        if expected_spec_hash is not None and meta["spec_hash"] != expected_spec_hash:
            raise ArtifactIntegrityError(
                f"{where} was trained for spec {meta['spec_hash']}, "
                f"the pipeline's spec is {expected_spec_hash}",
                hint="retrain the model for the current spec",
            )
        if expected_features is not None:
            _check_features(where, [str(f) for f in meta["feature_names"]], expected_features)
        return data

    def _pdir(self, pipeline: str) -> Path:
        if not _SAFE_NAME.match(pipeline):
            raise RegistryError(f"pipeline name {pipeline!r} is not a valid directory name")
        return self.root / pipeline

    def _read(self, pipeline: str) -> tuple[Path, dict[str, Any]]:
        pdir = self._pdir(pipeline)
        return pdir, _read_state(pdir)

    @contextlib.contextmanager
    def _edit(self, pipeline: str) -> Iterator[tuple[Path, dict[str, Any]]]:
        """The pipeline dir and its stages, under the pipeline's lock (released on close)."""
        pdir = self._pdir(pipeline)
        pdir.mkdir(parents=True, exist_ok=True)
        with open(pdir / ".lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield pdir, _read_state(pdir)

    def _require(self, pdir: Path, pipeline: str, version: str) -> None:
        if _VERSION.match(version) and (pdir / version / META_FILE).is_file():
            return
        known = [f"v{n}" for n in sorted(_numbers(pdir))]
        raise RegistryError(
            f"{pipeline} has no version {version!r}",
            hint=f"known versions: {', '.join(known)}" if known else "register a model first",
        )

    def _load(self, pdir: Path, pipeline: str, version: str, state: dict[str, Any]) -> ModelVersion:
        meta = _read_meta(pdir / version / META_FILE)
        if meta is None:
            raise RegistryError(f"{pipeline} {version}: {pdir / version / META_FILE} is missing")
        stage, challenger = _stage(state, version), state["challengers"].get(version, {})
        canaries = _canary_total(state)
        share = challenger.get("share")
        created = _to_utc(meta["created_at"])
        changed = _to_utc(state["history"][-1]["at"]) if state["history"] else created
        return ModelVersion(
            pipeline=pipeline,
            version=version,
            kind=str(meta["kind"]),
            stage=stage,
            mode=challenger.get("mode"),
            share=share,
            traffic_share=1.0 - canaries if stage == "champion" else float(share or 0.0),
            sha256=str(meta["sha256"]),
            artifact=pdir / version / str(meta["artifact"]),
            created_at=created,
            updated_at=max(created, changed),
            training_window=dict(meta["training_window"]),
            metadata=meta,
            **{key: meta[key] for key in _META_FIELDS},
        )


def _check_features(where: str, model: list[str], expected: Sequence[str]) -> None:
    """Refuse a model whose features differ from the pipeline's, naming the first difference."""
    for i in range(max(len(model), len(expected))):
        have = model[i] if i < len(model) else None
        want = expected[i] if i < len(expected) else None
        if have == want:
            continue
        if want is not None and want not in model:
            msg = f"pipeline feature {want!r} (position {i}) is missing from the model"
        elif have is not None and have not in expected:
            msg = f"model feature {have!r} (position {i}) is not a pipeline feature"
        else:
            msg = f"feature order differs at position {i}: model {have!r}, pipeline {want!r}"
        hint = "retrain the model for the pipeline's current features"
        raise ArtifactIntegrityError(f"{where}: {msg}", hint=hint)


def _canary_total(state: dict[str, Any], but: str = "") -> float:
    challengers = state["challengers"].items()
    return float(sum(c["share"] for v, c in challengers if c["mode"] == "canary" and v != but))


def _move(
    state: dict[str, Any], version: str, stage: str, challenger: dict[str, Any] | None = None
) -> str:
    """Put a version in a stage (the champion slot is overwritten); return its former stage."""
    before = _stage(state, version)
    state["challengers"].pop(version, None)
    _discard(state["archived"], version)
    if stage == "champion":
        state["champion"] = version
    elif stage == "challenger":
        state["challengers"][version] = challenger
    else:
        state["archived"].append(version)
    return before


def _stage(state: dict[str, Any], version: str) -> str:
    if state["champion"] == version:
        return "champion"
    if version in state["challengers"]:
        return "challenger"
    return "archived" if version in state["archived"] else "registered"


def _commit(
    pdir: Path,
    state: dict[str, Any],
    action: str,
    version: str,
    from_stage: str | None,
    reason: str | None,
    **details: Any,
) -> None:
    """Append a history entry and write stages.json atomically."""
    previous = details.pop("previous", state["champion"])
    entry = {"at": _now(), "action": action, "version": version, "previous": previous}
    state["history"].append(entry | {"reason": reason, "from_stage": from_stage, **details})
    try:
        _atomic_write(pdir / STAGES_FILE, _dumps(state))
    except OSError as exc:
        raise RegistryError(f"could not write {pdir / STAGES_FILE}: {exc}") from exc


def _read_state(pdir: Path) -> dict[str, Any]:
    state: dict[str, Any] = {"format": 1, "last_version": 0, "champion": None}
    state |= {"challengers": {}, "archived": [], "rollback": [], "history": []}
    return state | (_read_meta(pdir / STAGES_FILE) or {})


def _read_meta(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None if there is no file."""
    try:
        return dict(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ArtifactIntegrityError(f"{path} is not a valid JSON object: {exc}") from exc


def _numbers(pdir: Path) -> builtins.list[int]:
    """Version numbers taken in a pipeline dir, complete or not (a number is never reused)."""
    if not pdir.is_dir():
        return []
    return [int(m.group(1)) for p in pdir.iterdir() if (m := _VERSION.match(p.name))]


def _number(version: str) -> int:
    return int(m.group(1)) if (m := _VERSION.match(version)) else 0


def _discard(items: builtins.list[str], value: str) -> None:
    items[:] = [v for v in items if v != value]


def _window(window: dict[str, Any]) -> dict[str, Any]:
    """The training window with start/end as UTC ISO text."""
    out = dict(window)
    for key in ("start", "end"):
        if out.get(key) is not None:
            out[key] = _to_utc(out[key]).isoformat(timespec="milliseconds")
    if out.get("start") and out.get("end") and _to_utc(out["start"]) > _to_utc(out["end"]):
        raise RegistryError(f"training window starts after it ends: {out['start']} > {out['end']}")
    return out


def _to_utc(value: Any) -> dt.datetime:
    """A UTC datetime from a datetime, ISO text or epoch milliseconds (naive means UTC)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = dt.datetime.fromtimestamp(value / 1000, dt.UTC)
    try:
        when = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{value!r} is not a datetime, ISO time or epoch ms") from exc
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _dumps(value: dict[str, Any]) -> bytes:
    try:
        return json.dumps(value, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"model metadata is not plain JSON: {exc}") from exc


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
