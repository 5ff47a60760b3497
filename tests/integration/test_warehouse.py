"""DDL, insert and query through the warehouse on real chDB."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from streamml.config import Settings
from streamml.errors import MigrationError, WarehouseError
from streamml.schemas.migrations import CORE_TABLES, Migration, load_migrations
from streamml.streams.rows import PREDICTION_COLUMNS
from streamml.streams.warehouse import Warehouse
from streamml.testing import temporary_warehouse

from .helpers import run_cli

PRED_COLUMNS = PREDICTION_COLUMNS


def _prediction(event_id: str, score: float) -> tuple[object, ...]:
    ts = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    return (
        "p",
        event_id,
        "e1",
        ts,
        "m",
        "v1",
        "champion",
        1,
        score,
        "1",
        {"1": score},
        0.4,
        9.0,
        "",
    )


def test_migrations_create_the_core_tables_once(
    stack_settings: Settings, session_warehouse: Warehouse
) -> None:
    with temporary_warehouse(stack_settings, "t_migrate") as warehouse:
        assert set(CORE_TABLES) <= set(warehouse.tables())
        assert warehouse.migrate() == []  # idempotent: nothing left to apply
        applied = warehouse.query("SELECT version FROM schema_migrations FINAL ORDER BY version")
        assert [r[0] for r in applied.rows] == [m.version for m in load_migrations()]


def test_redelivered_predictions_collapse(
    stack_settings: Settings, session_warehouse: Warehouse
) -> None:
    with temporary_warehouse(stack_settings, "t_dedupe") as warehouse:
        rows = [_prediction("e-1", 0.9), _prediction("e-2", 0.2), _prediction("e-1", 0.9)]
        assert warehouse.insert("predictions", rows, PRED_COLUMNS) == 3
        result = warehouse.query(
            "SELECT event_id, score, probabilities['1'] FROM predictions FINAL ORDER BY event_id"
        )
        assert result.columns == ["event_id", "score", "arrayElement(probabilities, '1')"]
        assert result.rows == [("e-1", 0.9, 0.9), ("e-2", 0.2, 0.2)]


def test_edited_migration_is_refused(
    stack_settings: Settings, session_warehouse: Warehouse
) -> None:
    with temporary_warehouse(stack_settings, "t_edit") as warehouse:
        first = Migration(
            9001, "extra", "CREATE TABLE IF NOT EXISTS extra (x UInt8) ENGINE = Memory;"
        )
        assert warehouse.migrate([first]) == [first]
        edited = Migration(
            9001, "extra", "CREATE TABLE IF NOT EXISTS extra (y UInt8) ENGINE = Memory;"
        )
        with pytest.raises(MigrationError, match="changed after it was applied"):
            warehouse.migrate([edited])


def test_bad_sql_is_a_clear_warehouse_error(session_warehouse: Warehouse) -> None:
    with pytest.raises(WarehouseError, match=r"Syntax error|UNKNOWN_TABLE|Unknown table"):
        session_warehouse.query("SELEC nothing FROM nowhere")


def test_cli_query_prints_json_csv_and_table(tmp_path: object) -> None:
    env = {"STREAMML_STATE_DIR": str(tmp_path)}  # its own chDB: another process owns ours
    sql = "SELECT name FROM system.tables WHERE database = 'streamml' AND name = 'predictions'"
    as_json = run_cli("query", sql, "--format", "json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [{"name": "predictions"}]
    as_csv = run_cli("query", sql, "-f", "csv", env=env)
    assert as_csv.stdout.splitlines() == ["name", "predictions"]
    as_table = run_cli("query", sql, env=env)
    assert "predictions" in as_table.stdout and "1 row(s)" in as_table.stdout
    bad = run_cli("query", "SELECT * FROM no_such_table", env=env)
    assert bad.returncode == 1 and "error:" in bad.stderr


def test_cli_query_in_process_only_reads(tmp_path: object) -> None:
    """Without a worker `streamml query` opens chDB itself, and still refuses what
    /query refuses: writes, DDL and files, before they run."""
    env = {"STREAMML_STATE_DIR": str(tmp_path)}
    for sql in (
        "DROP TABLE labels",
        "INSERT INTO labels (pipeline, event_id) VALUES ('p', 'e')",
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
    ):
        refused = run_cli("query", sql, env=env)
        assert refused.returncode == 1 and "refused" in refused.stderr, (sql, refused.stderr)
    left = run_cli("query", "SELECT count() AS n FROM labels", "-f", "json", env=env)
    assert left.returncode == 0, left.stderr
    assert json.loads(left.stdout) == [{"n": 0}]


def test_second_process_gets_a_clear_lock_error(
    stack_settings: Settings, session_warehouse: Warehouse
) -> None:
    result = run_cli("query", "SELECT 1", env={"STREAMML_STATE_DIR": str(stack_settings.state_dir)})
    assert result.returncode == 1
    assert "open in another process" in result.stderr


def test_a_backfill_spanning_years_is_written_in_one_call(
    stack_settings: Settings, session_warehouse: Warehouse
) -> None:
    """Tables are partitioned by day and ClickHouse refuses an INSERT touching more than
    100 partitions: a batch of three years of events must still land (it used to wedge the
    sink, which retried it forever)."""
    with temporary_warehouse(stack_settings, "t_backfill") as warehouse:
        t0 = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)
        rows = []
        for i in range(1_100):
            row = list(_prediction(f"e-{i}", 0.5))
            row[3] = t0 + dt.timedelta(days=i)
            rows.append(tuple(row))
        assert warehouse.insert("predictions", rows, PRED_COLUMNS) == 1_100
        result = warehouse.query(
            "SELECT count(), uniqExact(toDate(ts)), min(ts) < '2023-01-02' FROM predictions"
        )
        assert [int(v) for v in result.rows[0]] == [1_100, 1_100, 1]
