"""Fetching the broker jars: a real Maven run against an unreachable repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamml.devstack.jars import ensure_kafka_jars
from streamml.errors import ArtifactFetchError

SETTINGS_XML = """<settings>
  <localRepository>{repo}</localRepository>
  <mirrors><mirror><id>nowhere</id><mirrorOf>*</mirrorOf>
    <url>http://127.0.0.1:{port}/maven2</url></mirror></mirrors>
</settings>"""


def test_unreachable_maven_central_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamml.testing import free_port

    home = tmp_path / "home"
    (home / ".m2").mkdir(parents=True)
    (home / ".m2" / "settings.xml").write_text(
        SETTINGS_XML.format(repo=tmp_path / "empty-repo", port=free_port())
    )
    monkeypatch.setenv("MAVEN_OPTS", f"-Duser.home={home} " + os.environ.get("MAVEN_OPTS", ""))
    with pytest.raises(ArtifactFetchError, match="Maven Central is unreachable") as err:
        ensure_kafka_jars("4.4.0", tmp_path / "cache")
    assert err.value.hint and "STREAMML_KAFKA_LIBS_DIR" in err.value.hint
    assert not (tmp_path / "cache" / "kafka" / "4.4.0" / "libs").exists()
