"""Model registry: versions, atomic writes, stages, verified loading, canary routing."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streamml.config import load_settings
from streamml.errors import ArtifactIntegrityError, RegistryError
from streamml.models.registry import (
    ModelVersion,
    Registry,
    canary_bucket,
    pick_canary,
    routes_to_canary,
)
from streamml.testing import TEST_SIGNING_KEY, register_dummy, temporary_registry

SQL = Path(__file__).resolve().parents[3] / "streamml" / "schemas" / "sql" / "0001_core_tables.sql"


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models", signing_key=TEST_SIGNING_KEY)


def _champion_with_canary(reg: Registry) -> None:
    """v1 champion, v2 canary at 10%."""
    register_dummy(reg, payload=b"one")
    register_dummy(reg, payload=b"two", parent_version="v1")
    reg.promote("demo", "v1")
    reg.set_challenger("demo", "v2", "canary", 0.1)


# --- registering -----------------------------------------------------------


def test_versions_count_up_and_hold_the_artifact_and_its_metadata(reg: Registry) -> None:
    first = register_dummy(reg, payload=b"first")
    second = register_dummy(reg, payload=b"second", parent_version="v1", metrics={"auc": 0.8})

    assert [first.version, second.version] == ["v1", "v2"]
    assert second.artifact == reg.root / "demo" / "v2" / "model.onnx"
    assert second.artifact.read_bytes() == b"second"
    assert second.sha256 == hashlib.sha256(b"second").hexdigest()
    assert (second.stage, second.parent_version, second.metrics) == (
        "registered",
        "v1",
        {"auc": 0.8},
    )
    assert second.created_at.tzinfo == dt.UTC
    meta = json.loads((reg.root / "demo" / "v2" / "meta.json").read_text())
    assert meta["feature_names"] == ["x1", "x2"]
    assert meta["training_window"]["start"] == "1970-01-01T00:00:00.000+00:00"
    assert [v.version for v in reg.list("demo")] == ["v1", "v2"]
    assert reg.pipelines() == ["demo"]


def test_a_file_artifact_keeps_its_name(reg: Registry, tmp_path: Path) -> None:
    source = tmp_path / "net.onnx"
    source.write_bytes(b"onnx bytes")
    mv = reg.register(
        "demo",
        source,
        kind="online",
        spec_hash="abc",
        feature_names=["a"],
        classes=None,
        task="regression",
        training_window={},
        metrics={},
        params={"lr": 0.1},
        parent_version=None,
    )
    assert mv.artifact.name == "net.onnx"
    assert reg.load_artifact("demo", "v1") == b"onnx bytes"
    assert mv.extra_columns()["params"] == '{"lr": 0.1}'


def _register_many(root: str, tag: str, count: int, barrier: Any) -> list[str]:
    registry = Registry(Path(root), signing_key=TEST_SIGNING_KEY)
    barrier.wait()
    payloads = [f"{tag}-{i}".encode() for i in range(count)]
    return [register_dummy(registry, payload=p).version for p in payloads]


def test_two_processes_registering_at_once_never_get_the_same_version(reg: Registry) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        jobs = [pool.apply_async(_register_many, (str(reg.root), t, 15, barrier)) for t in "ab"]
        got = [job.get(timeout=120) for job in jobs]

    versions = got[0] + got[1]
    assert len(set(versions)) == 30
    assert sorted(versions, key=lambda v: int(v[1:])) == [f"v{n}" for n in range(1, 31)]
    # every version holds the bytes of exactly one registration, and they verify
    payloads = {reg.load_artifact("demo", v) for v in versions}
    assert payloads == {f"{t}-{i}".encode() for t in "ab" for i in range(15)}
    assert [e["action"] for e in reg.history("demo")] == ["register"] * 30


def test_version_numbers_are_never_reused(reg: Registry) -> None:
    register_dummy(reg)
    register_dummy(reg)
    reg.archive("demo", "v2")
    assert register_dummy(reg).version == "v3"
    shutil.rmtree(reg.root / "demo" / "v3")  # even if someone deletes the newest version
    assert register_dummy(reg).version == "v4"


def test_register_refuses_bad_input_before_taking_a_number(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="kind must be one of batch, online"):
        register_dummy(reg, kind="nightly")
    with pytest.raises(RegistryError, match="demo has no version 'v7'") as err:
        register_dummy(reg, parent_version="v7")
    assert err.value.hint == "register a model first"
    with pytest.raises(RegistryError, match="metric 'auc' is not a finite number"):
        register_dummy(reg, metrics={"auc": float("nan")})
    with pytest.raises(RegistryError, match="not plain JSON"):
        register_dummy(reg, params={"when": dt.datetime.now()})
    with pytest.raises(RegistryError, match="training window starts after it ends"):
        register_dummy(reg, training_window={"start": 2000, "end": 1000})
    assert reg.list("demo") == []
    assert register_dummy(reg).version == "v1"


# --- atomicity -----------------------------------------------------------------


def _boom(*args: Any, **kwargs: Any) -> None:
    raise OSError(28, "No space left on device")


def test_a_crash_while_writing_leaves_no_half_version(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_dummy(reg, payload=b"good")
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _boom)
        with pytest.raises(RegistryError, match=r"could not write .*v2: .*No space left"):
            register_dummy(reg, payload=b"lost")

    assert [v.version for v in reg.list("demo")] == ["v1"]
    leftovers = [p.name for p in (reg.root / "demo").iterdir()]
    assert sorted(leftovers) == [".lock", "stages.json", "v1"]
    assert sorted(p.name for p in (reg.root / "demo" / "v1").iterdir()) == [
        "meta.json",
        "model.onnx",
    ]
    assert register_dummy(reg, payload=b"next").version == "v2"
    assert reg.load_artifact("demo", "v2") == b"next"


def test_debris_of_a_killed_process_is_ignored(reg: Registry) -> None:
    register_dummy(reg)
    pdir = reg.root / "demo"
    (pdir / ".staging-dead").mkdir()
    (pdir / ".staging-dead" / "model.onnx").write_bytes(b"half")
    (pdir / "v2").mkdir()  # a version dir without meta.json (written by hand, or older code)
    (pdir / "v2" / "model.onnx").write_bytes(b"half")

    assert [v.version for v in reg.list("demo")] == ["v1"]
    with pytest.raises(RegistryError, match="no version 'v2'") as err:
        reg.get("demo", "v2")
    assert err.value.hint == "known versions: v1, v2"
    with pytest.raises(ArtifactIntegrityError, match=r"meta\.json is missing"):
        reg.load_artifact("demo", "v2")
    assert register_dummy(reg).version == "v3"
    assert not (pdir / ".staging-dead").exists()


def test_a_failed_stage_write_keeps_the_previous_stages(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _champion_with_canary(reg)
    before = (reg.root / "demo" / "stages.json").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _boom)
        with pytest.raises(RegistryError, match=r"could not write .*stages\.json"):
            reg.promote("demo")

    assert (reg.root / "demo" / "stages.json").read_bytes() == before
    champion = reg.champion("demo")
    assert champion is not None and champion.version == "v1"
    assert [c.version for c in reg.challengers("demo")] == ["v2"]
    assert not [p for p in (reg.root / "demo").iterdir() if p.name.endswith(".tmp")]


# --- stages --------------------------------------------------------------------


def test_promote_then_rollback_restores_the_previous_champion(reg: Registry) -> None:
    _champion_with_canary(reg)

    promoted = reg.promote("demo", reason="canary beat champion")  # the only challenger
    assert (promoted.version, promoted.stage, promoted.traffic_share) == ("v2", "champion", 1.0)
    assert reg.challengers("demo") == []
    assert {v.version: v.stage for v in reg.list("demo")} == {"v1": "archived", "v2": "champion"}

    restored = reg.rollback("demo", reason="v2 drifted")
    assert (restored.version, restored.stage) == ("v1", "champion")
    assert {v.version: v.stage for v in reg.list("demo")} == {"v1": "champion", "v2": "archived"}

    with pytest.raises(RegistryError, match="no previous champion to roll back to") as err:
        reg.rollback("demo")
    assert "promote" in str(err.value.hint)


def test_rollback_walks_back_through_champions(reg: Registry) -> None:
    for _ in range(3):
        register_dummy(reg)
    for version in ("v1", "v2", "v3"):
        reg.promote("demo", version)
    assert reg.rollback("demo").version == "v2"
    assert reg.rollback("demo").version == "v1"
    with pytest.raises(RegistryError, match=r"\(v1 is its first champion\)"):
        reg.rollback("demo")


def test_retiring_the_first_champion_leaves_none(reg: Registry) -> None:
    register_dummy(reg)
    reg.promote("demo", "v1")
    assert not reg.can_roll_back("demo")
    retired = reg.retire_champion("demo", reason="worse than the online model")
    assert (retired.version, retired.stage) == ("v1", "archived")
    assert reg.champion("demo") is None
    assert reg.history("demo")[-1]["action"] == "retire"
    with pytest.raises(RegistryError, match="no champion to retire"):
        reg.retire_champion("demo")


def test_rollback_without_any_champion_is_refused(reg: Registry) -> None:
    register_dummy(reg)
    with pytest.raises(RegistryError, match="it has no champion") as err:
        reg.rollback("demo")
    assert err.value.hint == "promote a version instead: promote(pipeline, version)"


def test_promote_needs_to_know_which_version(reg: Registry) -> None:
    for _ in range(3):
        register_dummy(reg)
    with pytest.raises(RegistryError, match="demo has no challenger: which to promote"):
        reg.promote("demo")
    reg.set_challenger("demo", "v2", "shadow")
    reg.set_challenger("demo", "v3", "canary", 0.2)
    with pytest.raises(RegistryError, match="challengers v2, v3") as err:
        reg.promote("demo")
    assert err.value.hint == "pass version=, or set_challenger() first"
    reg.promote("demo", "v3")
    with pytest.raises(RegistryError, match="v3 is already the champion"):
        reg.promote("demo", "v3")
    assert [c.version for c in reg.challengers("demo")] == ["v2"]


def test_the_champion_cannot_be_archived_or_made_a_challenger(reg: Registry) -> None:
    register_dummy(reg)
    reg.promote("demo", "v1")
    with pytest.raises(RegistryError, match="v1 is the champion and cannot be archived") as err:
        reg.archive("demo", "v1")
    assert err.value.hint == "promote another version or roll back first"
    with pytest.raises(RegistryError, match="cannot also be a challenger"):
        reg.set_challenger("demo", "v1", "shadow")
    champion = reg.champion("demo")
    assert champion is not None and champion.stage == "champion"


def test_archiving_a_challenger_stops_it_and_twice_is_harmless(reg: Registry) -> None:
    _champion_with_canary(reg)
    archived = reg.archive("demo", "v2", reason="worse AUC")
    assert (archived.stage, archived.mode, archived.share) == ("archived", None, None)
    assert reg.challengers("demo") == []
    entries = len(reg.history("demo"))
    reg.archive("demo", "v2")
    assert len(reg.history("demo")) == entries
    # an archived version can come back as a challenger
    assert reg.set_challenger("demo", "v2", "shadow").stage == "challenger"


def test_challenger_modes_and_shares_are_checked(reg: Registry) -> None:
    for _ in range(4):
        register_dummy(reg)
    reg.promote("demo", "v1")
    with pytest.raises(RegistryError, match="mode must be shadow or canary, got 'blue'"):
        reg.set_challenger("demo", "v2", "blue")
    for share in (None, 0.0, 1.0, 1.5):
        with pytest.raises(RegistryError, match=r"a canary needs a share in \(0, 1\)"):
            reg.set_challenger("demo", "v2", "canary", share)
    with pytest.raises(RegistryError, match="a shadow challenger serves no traffic"):
        reg.set_challenger("demo", "v2", "shadow", 0.1)
    reg.set_challenger("demo", "v2", "canary", 0.5)
    reg.set_challenger("demo", "v3", "canary", 0.3)
    with pytest.raises(RegistryError, match="canary shares would total 1"):
        reg.set_challenger("demo", "v4", "canary", 0.2)
    reg.set_challenger("demo", "v2", "canary", 0.4)  # changing a share counts it once
    reg.set_challenger("demo", "v4", "shadow")

    shares = {v.version: (v.stage, v.mode, v.traffic_share) for v in reg.list("demo")}
    assert shares["v1"][:2] == ("champion", None) and shares["v1"][2] == pytest.approx(0.3)
    assert shares["v2"] == ("challenger", "canary", 0.4)
    assert shares["v4"] == ("challenger", "shadow", 0.0)


def test_history_records_every_stage_change_with_its_reason(reg: Registry) -> None:
    _champion_with_canary(reg)
    reg.promote("demo", reason="better")
    reg.rollback("demo", reason="drift")
    reg.archive("demo", "v2")

    history = reg.history("demo")
    compact = [(e["action"], e["version"], e["previous"], e["reason"]) for e in history]
    assert compact == [
        ("register", "v1", None, None),
        ("register", "v2", None, None),
        ("promote", "v1", None, None),
        ("challenger", "v2", "v1", None),
        ("promote", "v2", "v1", "better"),
        ("rollback", "v1", "v2", "drift"),
    ]  # the last archive() found v2 archived by the rollback already: no entry
    assert history[3]["mode"] == "canary" and history[3]["share"] == 0.1
    assert history[4]["from_stage"] == "challenger"
    times = [dt.datetime.fromisoformat(e["at"]) for e in history]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    # another process (a fresh Registry on the same root) sees the same state
    assert Registry(reg.root).history("demo") == history


def test_unknown_names_are_refused_clearly(reg: Registry) -> None:
    assert reg.list("nothing") == [] and reg.champion("nothing") is None
    assert reg.pipelines() == []
    register_dummy(reg)
    with pytest.raises(RegistryError, match="demo has no version 'v9'") as err:
        reg.promote("demo", "v9")
    assert err.value.hint == "known versions: v1"
    with pytest.raises(RegistryError, match="not a valid directory name"):
        reg.list("../etc")


# --- loading with verification -------------------------------------------------


def test_tampered_artifact_bytes_are_refused(reg: Registry) -> None:
    mv = register_dummy(reg, payload=b"weights")
    mv.artifact.write_bytes(b"weightz")
    with pytest.raises(ArtifactIntegrityError, match="checksum mismatch") as err:
        reg.load_artifact("demo", "v1")
    message = str(err.value)
    assert str(mv.artifact) in message
    assert mv.sha256 in message and hashlib.sha256(b"weightz").hexdigest() in message


def test_missing_artifact_is_refused(reg: Registry) -> None:
    mv = register_dummy(reg)
    mv.artifact.unlink()
    with pytest.raises(ArtifactIntegrityError, match=r"cannot read .*model\.onnx"):
        reg.load_artifact("demo", "v1")
    with pytest.raises(ArtifactIntegrityError, match=r"meta\.json is missing"):
        reg.load_artifact("demo", "v5")


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        (["x1", "x3"], "pipeline feature 'x3' \\(position 1\\) is missing from the model"),
        (["x1"], "model feature 'x2' \\(position 1\\) is not a pipeline feature"),
        (["x1", "x2", "x3"], "pipeline feature 'x3' \\(position 2\\) is missing"),
        (["x2", "x1"], "feature order differs at position 0: model 'x1', pipeline 'x2'"),
    ],
)
def test_a_different_feature_list_is_refused(
    reg: Registry, expected: list[str], message: str
) -> None:
    register_dummy(reg)
    with pytest.raises(ArtifactIntegrityError, match=message) as err:
        reg.load_artifact("demo", "v1", expected_features=expected)
    assert err.value.hint == "retrain the model for the pipeline's current features"
    assert reg.load_artifact("demo", "v1", expected_features=["x1", "x2"]) == b"model"


def test_a_model_for_another_spec_is_refused(reg: Registry) -> None:
    register_dummy(reg, spec_hash="aaaa")
    with pytest.raises(ArtifactIntegrityError, match=r"trained for spec aaaa.*spec is bbbb"):
        reg.load_artifact("demo", "v1", expected_spec_hash="bbbb")
    assert reg.load_artifact("demo", "v1", expected_spec_hash="aaaa") == b"model"


# --- warehouse rows --------------------------------------------------------------


def _model_versions_columns() -> list[str]:
    block = re.search(r"TABLE IF NOT EXISTS model_versions\s*\((.*?)\n\)", SQL.read_text(), re.S)
    assert block is not None
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip()]


def test_rows_have_exactly_the_model_versions_columns(reg: Registry) -> None:
    _champion_with_canary(reg)
    champion, canary = reg.list("demo")
    row = canary.to_row()

    assert list(row) == _model_versions_columns()
    assert row["artifact_uri"] == canary.artifact.as_uri()
    assert (row["stage"], row["traffic_share"], row["parent_version"]) == ("challenger", 0.1, "v1")
    assert row["train_start"] == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert row["train_end"] == dt.datetime(1970, 1, 1, 0, 1, tzinfo=dt.UTC)
    assert champion.to_row()["traffic_share"] == pytest.approx(0.9)
    assert champion.to_row()["parent_version"] == ""
    assert row["updated_at"] >= row["created_at"]
    assert set(canary.extra_columns()) == {"mode", "task", "classes", "train_rows", "params"}
    assert canary.extra_columns()["mode"] == "canary"
    assert not set(canary.extra_columns()) & set(row)


# --- canary routing --------------------------------------------------------------


def test_canary_buckets_are_the_same_in_every_process() -> None:
    keys = [f"user-{i}" for i in range(50)]
    code = (
        "import json, sys; from streamml.models.registry import canary_bucket;"
        "print(json.dumps([canary_bucket(k) for k in json.loads(sys.argv[1])]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(keys)], env=env, capture_output=True, check=True
    )
    assert json.loads(out.stdout) == [canary_bucket(k) for k in keys]


def test_a_canary_gets_about_its_share_and_growing_it_keeps_its_keys() -> None:
    keys = [f"entity-{i}" for i in range(10_000)]
    small = {k for k in keys if routes_to_canary(k, 0.1)}
    large = {k for k in keys if routes_to_canary(k, 0.3)}
    assert 800 <= len(small) <= 1200
    assert 2700 <= len(large) <= 3300
    assert small <= large
    assert not any(routes_to_canary(k, 0.0) for k in keys)
    assert all(routes_to_canary(k, 1.0) for k in keys)
    assert all(0.0 <= canary_bucket(k) < 1.0 for k in keys)


def test_several_canaries_get_disjoint_keys(reg: Registry) -> None:
    for _ in range(3):
        register_dummy(reg)
    reg.promote("demo", "v1")
    reg.set_challenger("demo", "v2", "canary", 0.1)
    reg.set_challenger("demo", "v3", "canary", 0.2)
    challengers: list[ModelVersion] = reg.challengers("demo")
    picked = [pick_canary(f"k{i}", challengers) for i in range(10_000)]
    counts = {v: sum(1 for p in picked if p is not None and p.version == v) for v in ("v2", "v3")}
    assert 800 <= counts["v2"] <= 1200 and 1700 <= counts["v3"] <= 2300
    assert sum(p is None for p in picked) == 10_000 - counts["v2"] - counts["v3"]


def test_the_shared_registry_lives_in_the_state_dir_unless_set(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    assert Registry(settings.registry_path).root == tmp_path.resolve() / "state" / "models"
    elsewhere = load_settings(state_dir=tmp_path / "state", registry_dir=tmp_path / "shared")
    assert Registry(elsewhere.registry_path).root == tmp_path.resolve() / "shared"


def test_temporary_registry_is_removed_afterwards() -> None:
    with temporary_registry() as registry:
        register_dummy(registry)
        root = registry.root
        assert registry.pipelines() == ["demo"]
    assert not root.exists()
