from __future__ import annotations

import stat
from pathlib import Path

import pytest

from streamml.devstack.jars import ensure_kafka_jars, find_java, parse_java_version
from streamml.errors import ArtifactFetchError, JavaNotFoundError


@pytest.mark.parametrize(
    ("banner", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "25" 2025-09-16', 25),
        ('java version "1.8.0_402"', 8),
        ('openjdk version "11.0.2" 2019-01-15', 11),
    ],
)
def test_parse_java_version(banner: str, major: int) -> None:
    assert parse_java_version(banner) == major


def _fake_java(home: Path, banner: str) -> Path:
    java = home / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho '{banner}' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return home


def test_too_old_java_is_refused_with_a_hint(tmp_path: Path) -> None:
    home = _fake_java(tmp_path, 'openjdk version "11.0.2" 2019-01-15')
    with pytest.raises(JavaNotFoundError, match="Java 11") as err:
        find_java(home)
    assert err.value.hint and "STREAMML_JAVA_HOME" in err.value.hint


def test_missing_java_home_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JavaNotFoundError, match="no Java runtime found"):
        find_java(tmp_path / "nowhere")


def test_recent_java_is_accepted(tmp_path: Path) -> None:
    home = _fake_java(tmp_path, 'openjdk version "21.0.1" 2023-10-17')
    java, major = find_java(home)
    assert (java, major) == (home / "bin" / "java", 21)


def test_libs_dir_without_kafka_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactFetchError, match=r"holds no kafka_2\.13"):
        ensure_kafka_jars("4.4.0", tmp_path / "cache", libs_dir=tmp_path)


def test_missing_maven_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ArtifactFetchError, match="Maven") as err:
        ensure_kafka_jars("4.4.0", tmp_path / "cache")
    assert err.value.hint and "STREAMML_KAFKA_LIBS_DIR" in err.value.hint
