"""Signed models: a version is signed at registration and its signature is checked before
the artifact is loaded; unsigned, foreign-key and edited versions are refused by name."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamml.config import load_settings
from streamml.errors import ArtifactIntegrityError, RegistryError
from streamml.models.registry import (
    SIGNED_FIELDS,
    ModelVersion,
    Registry,
    key_id,
    sign,
    verify,
)
from streamml.models.serving import plan
from streamml.testing import TEST_SIGNING_KEY, register_dummy, temporary_registry
from tests.unit.models.test_training import make_spec

OTHER_KEY = b"someone-elses-model-signing-key"


@pytest.fixture
def reg() -> Iterator[Registry]:
    with temporary_registry() as registry:
        yield registry


def _meta_path(mv: ModelVersion) -> Path:
    return mv.artifact.parent / "meta.json"


def _edit_meta(mv: ModelVersion, edit: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads(_meta_path(mv).read_text())
    edit(meta)
    _meta_path(mv).write_text(json.dumps(meta))


def _refusal(reg: Registry, version: str = "v1") -> str:
    with pytest.raises(ArtifactIntegrityError) as info:
        reg.load_artifact("demo", version)
    return str(info.value)


# --- signing at registration -------------------------------------------------------------


def test_a_registered_version_is_signed_and_loads(reg: Registry) -> None:
    mv = register_dummy(reg, payload=b"onnx bytes")

    signature = mv.metadata["signature"]
    assert signature["algorithm"] == "hmac-sha256"
    assert signature["key_id"] == key_id(TEST_SIGNING_KEY) == reg.key_id
    assert len(signature["hmac"]) == 64
    assert reg.load_artifact("demo", "v1") == b"onnx bytes"
    # the key itself is never written next to the model
    assert TEST_SIGNING_KEY.hex() not in _meta_path(mv).read_text()
    assert TEST_SIGNING_KEY.decode() not in _meta_path(mv).read_text()


def test_a_worker_with_the_same_key_verifies_what_another_process_signed(
    reg: Registry,
) -> None:
    register_dummy(reg, payload=b"model")
    worker = Registry(reg.root, signing_key=TEST_SIGNING_KEY)
    assert worker.load_artifact("demo", "v1") == b"model"


# --- refusals ----------------------------------------------------------------------------


def test_an_unsigned_artifact_is_refused(reg: Registry) -> None:
    mv = register_dummy(reg)
    _edit_meta(mv, lambda meta: meta.pop("signature"))

    with pytest.raises(ArtifactIntegrityError, match="demo v1: the artifact is unsigned") as info:
        reg.load_artifact("demo", "v1")
    assert info.value.hint and "register it again" in info.value.hint


def test_an_artifact_signed_with_another_key_is_refused_naming_both_keys(
    reg: Registry,
) -> None:
    foreign = Registry(reg.root, signing_key=OTHER_KEY)
    register_dummy(foreign, payload=b"foreign")
    assert foreign.load_artifact("demo", "v1") == b"foreign"  # its own key accepts it

    message = _refusal(reg)

    assert (
        f"signed with another key (key id {key_id(OTHER_KEY)}, "
        f"this worker's {key_id(TEST_SIGNING_KEY)})"
    ) in message
    assert "STREAMML_MODEL_SIGNING_KEY" in message  # the hint says what to align


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("feature_names", ["x2", "x1"]),
        ("spec_hash", "f" * 16),
        ("classes", ["1", "0"]),
        ("task", "regression"),
        ("kind", "online"),
    ],
)
def test_edited_signed_metadata_is_refused(reg: Registry, field: str, value: Any) -> None:
    mv = register_dummy(reg)
    _edit_meta(mv, lambda meta: meta.update({field: value}))

    assert "demo v1: signature does not match its metadata" in _refusal(reg)


def test_a_swapped_artifact_with_its_checksum_updated_is_refused(reg: Registry) -> None:
    mv = register_dummy(reg, payload=b"genuine")
    swapped = b"swapped model"
    mv.artifact.write_bytes(swapped)
    assert "checksum mismatch" in _refusal(reg)  # the bytes alone: the checksum catches it

    _edit_meta(mv, lambda meta: meta.update(sha256=hashlib.sha256(swapped).hexdigest()))
    assert "signature does not match" in _refusal(reg)  # and the checksum with them: signed


def test_a_signature_cannot_be_moved_to_another_version(reg: Registry) -> None:
    v1 = register_dummy(reg, payload=b"same bytes")
    v2 = register_dummy(reg, payload=b"same bytes")
    assert v1.sha256 == v2.sha256
    _edit_meta(v2, lambda meta: meta.update(signature=v1.metadata["signature"]))

    assert "demo v2: signature does not match" in _refusal(reg, "v2")
    assert reg.load_artifact("demo", "v1") == b"same bytes"


def test_a_whole_version_copied_under_another_number_is_refused(reg: Registry) -> None:
    v1 = register_dummy(reg, payload=b"one")
    register_dummy(reg, payload=b"two")
    v2_dir = v1.artifact.parent.parent / "v2"
    shutil.rmtree(v2_dir)
    shutil.copytree(v1.artifact.parent, v2_dir)  # v1's meta.json, now claiming to be v2

    assert "signature does not match" in _refusal(reg, "v2")


def test_a_version_copied_into_another_pipeline_is_refused(reg: Registry) -> None:
    v1 = register_dummy(reg, pipeline="demo", payload=b"one")
    register_dummy(reg, pipeline="other", payload=b"two")
    target = reg.root / "other" / "v1"
    shutil.rmtree(target)
    shutil.copytree(v1.artifact.parent, target)

    with pytest.raises(ArtifactIntegrityError, match="other v1: signature does not match"):
        reg.load_artifact("other", "v1")


def test_unsigned_metadata_can_change_without_breaking_the_signature(reg: Registry) -> None:
    """Metrics and notes describe a model but do not change what it serves."""
    mv = register_dummy(reg, payload=b"model")
    _edit_meta(mv, lambda meta: meta.update(metrics={"accuracy": 0.5}, extra={"note": "x"}))
    assert reg.load_artifact("demo", "v1") == b"model"


def test_an_unknown_signature_algorithm_is_refused(reg: Registry) -> None:
    mv = register_dummy(reg)
    _edit_meta(mv, lambda meta: meta["signature"].update(algorithm="none"))
    assert "signature algorithm 'none' is not supported" in _refusal(reg)


def test_serving_refuses_an_unsigned_champion_and_names_it(reg: Registry) -> None:
    spec = make_spec()
    mv = register_dummy(reg, pipeline=spec.name, spec_hash=spec.spec_hash)
    reg.promote(spec.name, "v1")
    _edit_meta(mv, lambda meta: meta.pop("signature"))

    with pytest.raises(ArtifactIntegrityError, match="unsigned") as info:
        plan(spec, reg)
    assert info.value.version == "v1"


# --- the key -----------------------------------------------------------------------------


def test_without_a_key_nothing_is_registered_or_loaded_but_stages_still_read(
    reg: Registry,
) -> None:
    register_dummy(reg)
    keyless = Registry(reg.root)
    assert keyless.key_id is None

    with pytest.raises(RegistryError, match="no model signing key"):
        register_dummy(keyless)
    with pytest.raises(ArtifactIntegrityError, match="cannot verify demo v1"):
        keyless.load_artifact("demo", "v1")
    assert [mv.version for mv in keyless.list("demo")] == ["v1"]
    assert Registry(reg.root, signing_key=b"").key_id is None  # an empty key is no key


def test_the_registry_of_the_settings_signs_with_the_configured_key(tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path / "state", secrets_dir=tmp_path / "secrets", model_signing_key="k-1"
    )
    assert Registry.from_settings(settings).key_id == key_id(b"k-1")

    generated = load_settings(state_dir=tmp_path / "state", secrets_dir=tmp_path / "secrets")
    first = Registry.from_settings(generated)
    assert first.key_id is not None and first.key_id != key_id(b"k-1")
    assert Registry.from_settings(generated).key_id == first.key_id  # generated once, kept
    register_dummy(first, payload=b"m")
    with pytest.raises(ArtifactIntegrityError, match="signed with another key"):
        Registry.from_settings(settings).load_artifact("demo", "v1")


# --- the signing core, over many metadata --------------------------------------------------

_text = st.text(max_size=12)
_metas = st.fixed_dictionaries(
    {
        "pipeline": _text,
        "version": st.from_regex(r"v[1-9][0-9]{0,3}", fullmatch=True),
        "kind": st.sampled_from(["batch", "online"]),
        "sha256": st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
        "spec_hash": _text,
        "feature_names": st.lists(_text, max_size=5),
        "classes": st.none() | st.lists(_text, max_size=3),
        "task": _text,
    }
)
_keys = st.binary(min_size=1, max_size=48)


@given(meta=_metas, key=_keys, field=st.sampled_from(SIGNED_FIELDS), other=_metas)
def test_a_signature_verifies_under_its_key_and_breaks_on_any_signed_field(
    meta: dict[str, Any], key: bytes, field: str, other: dict[str, Any]
) -> None:
    signed = meta | {"signature": sign(meta, key)}
    verify(signed, key, "p v")  # no error

    edited = signed | {field: other[field]}
    if other[field] != meta[field]:
        with pytest.raises(ArtifactIntegrityError, match="signature does not match"):
            verify(edited, key, "p v")


@given(meta=_metas, key=_keys, wrong=_keys)
def test_a_signature_never_verifies_under_another_key(
    meta: dict[str, Any], key: bytes, wrong: bytes
) -> None:
    signed = meta | {"signature": sign(meta, key)}
    if wrong != key:
        with pytest.raises(ArtifactIntegrityError, match=r"another key|does not match"):
            verify(signed, wrong, "p v")
