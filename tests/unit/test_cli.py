"""CLI behaviour that needs no services: config printing and start-up errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamml.cli import app

runner = CliRunner()


def test_config_prints_masked_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMML_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("STREAMML_CLICKHOUSE_DSN", "http://admin:hunter2@ch:8123")
    result = runner.invoke(app, ["config", "--json"])
    assert result.exit_code == 0, result.output
    values = json.loads(result.stdout)
    assert values["clickhouse_dsn"] == "http://admin:***@ch:8123"
    assert values["state_dir"] == str(tmp_path)
    assert "hunter2" not in result.output


def test_config_table_lists_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0
    assert "STREAMML_KAFKA_BOOTSTRAP" in result.stdout


def test_invalid_setting_fails_every_command_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMML_TOPIC_PARTITIONS", "0")
    for command in (["config"], ["up"], ["status"], ["query", "SELECT 1"], ["demo"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, command
        assert "STREAMML_TOPIC_PARTITIONS" in result.stderr


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and result.stdout.strip() == "0.1.0"
