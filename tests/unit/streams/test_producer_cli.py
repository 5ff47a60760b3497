"""`streamml produce --resume` decisions taken before any broker is contacted: a changed
file is refused, a finished one is not sent again, and a plain re-run warns."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamml.cli import app
from streamml.config import load_settings
from streamml.streams.ledger import FileProgress, Ledger
from streamml.testing import free_port

ROOT = Path(__file__).resolve().parents[3]
runner = CliRunner()


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A two-record file; the settings point at a port where no broker listens."""
    monkeypatch.setenv("STREAMML_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("STREAMML_PIPELINES_DIR", str(ROOT / "pipelines"))
    monkeypatch.setenv("STREAMML_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("STREAMML_REQUEST_TIMEOUT_S", "1")
    path = tmp_path / "in.jsonl"
    path.write_text('{"event_id": "e1", "user_id": "u1"}\n{"event_id": "e2", "user_id": "u2"}\n')
    return path


def _save(path: Path, records: int, complete: bool = False) -> None:
    ledger = Ledger()
    for i in range(records):
        ledger.records.add(i)
        ledger.labels.add(i)
    FileProgress.of(load_settings(), "demo", path).save(ledger, complete)


def test_resume_refuses_a_file_that_changed(data: Path) -> None:
    _save(data, 1)
    data.write_text(data.read_text() + '{"event_id": "e3", "user_id": "u3"}\n')
    result = runner.invoke(app, ["produce", "demo", str(data), "--resume"])
    assert result.exit_code == 2, result.output
    assert "changed since the run to resume" in result.stderr
    assert "without --resume" in result.stderr


def test_resume_without_an_unfinished_run_is_refused(data: Path) -> None:
    result = runner.invoke(app, ["produce", "demo", str(data), "--resume"])
    assert result.exit_code == 2, result.output
    assert "no unfinished run" in result.stderr


def test_resume_of_a_finished_file_sends_nothing(data: Path) -> None:
    _save(data, 2, complete=True)
    result = runner.invoke(app, ["produce", "demo", str(data), "--resume"])
    assert result.exit_code == 0, result.output
    assert "delivered completely already" in result.stdout


def test_a_plain_rerun_of_an_unfinished_file_warns_of_duplicates(data: Path) -> None:
    _save(data, 1)
    result = runner.invoke(app, ["produce", "demo", str(data)])
    assert "delivered the first 1 records of" in result.stderr and "--resume" in result.stderr
    assert result.exit_code == 1  # then no broker answers, as the settings say
