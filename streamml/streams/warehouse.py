"""The warehouse: ClickHouse through clickhouse-connect, embedded chDB by default.

One code path serves both: ``chdb:///abs/path`` opens chDB in this process (only
one process may own a path), ``http(s)://host:port`` talks to a ClickHouse server.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from streamml.config import Settings, mask_dsn
from streamml.errors import MigrationError, WarehouseError, WarehouseLockedError
from streamml.schemas.migrations import Migration, load_migrations

MIGRATIONS_TABLE = "schema_migrations"


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


# chDB: one process may open one path, and only one process may own a path.
_chdb_path_in_this_process: str | None = None


def _check_chdb_path(path: str) -> None:
    """Fail clearly, before chDB prints its own noise, if the path cannot be opened here."""
    global _chdb_path_in_this_process
    if _chdb_path_in_this_process is not None:
        if _chdb_path_in_this_process != path:
            raise WarehouseError(
                f"this process already has the embedded warehouse {_chdb_path_in_this_process} "
                f"open; chDB cannot open a second path ({path})",
                hint="use one STREAMML_STATE_DIR / STREAMML_CLICKHOUSE_DSN per process",
            )
        return
    status = Path(path) / "status"
    if status.exists():
        with status.open("rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = handle.read(200).decode("utf-8", "replace").splitlines()
                pid = next(
                    (ln.split(":", 1)[1].strip() for ln in owner if ln.startswith("PID")), "?"
                )
                raise WarehouseLockedError(
                    f"the embedded warehouse {path} is open in another process (pid {pid})",
                    hint="chDB allows one owner process: stop that process, run the query "
                    "through it, or configure a ClickHouse server with STREAMML_CLICKHOUSE_DSN",
                ) from None
            fcntl.flock(handle, fcntl.LOCK_UN)
    _chdb_path_in_this_process = path


def _open_client(dsn: str, database: str | None) -> Client:
    scheme = urlsplit(dsn).scheme
    try:
        if scheme == "chdb":
            path = urlsplit(dsn).path
            if path and path != "memory":
                Path(path).mkdir(parents=True, exist_ok=True)
                _check_chdb_path(path)
            return clickhouse_connect.get_client(dsn=dsn, database=database or "")
        return clickhouse_connect.get_client(
            dsn=dsn, database=database or "", connect_timeout=10, send_receive_timeout=60
        )
    except WarehouseError:
        raise
    except Exception as exc:  # the drivers raise a mix of their own and OS errors
        text = str(exc) or type(exc).__name__
        raise WarehouseError(
            f"cannot connect to the warehouse {mask_dsn(dsn)}: {text.splitlines()[0][:300]}",
            hint="check STREAMML_CLICKHOUSE_DSN",
        ) from exc


class Warehouse:
    """A connected warehouse with the streamml database selected."""

    def __init__(self, client: Client, database: str, dsn: str) -> None:
        self.client = client
        self.database = database
        self.dsn = dsn
        # One client is not safe for concurrent use (the sink inserts from a thread
        # while /query reads): calls go through one at a time.
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, settings: Settings, migrate: bool = True) -> Warehouse:
        """Open the configured warehouse, create the database and apply pending migrations."""
        dsn = settings.warehouse_dsn
        db = settings.clickhouse_database
        bootstrap = _open_client(dsn, None)
        try:
            bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        except ClickHouseError as exc:
            raise WarehouseError(f"cannot create database {db!r}: {exc}") from exc
        client = _open_client(dsn, db) if urlsplit(dsn).scheme != "chdb" else bootstrap
        if client is bootstrap:
            client.database = db
        else:
            bootstrap.close()
        warehouse = cls(client, db, dsn)
        if migrate:
            warehouse.migrate()
        return warehouse

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- schema -------------------------------------------------------------------
    def migrate(self, migrations: Sequence[Migration] | None = None) -> list[Migration]:
        """Apply the migrations not yet applied, in order; refuse edited ones."""
        todo = list(migrations) if migrations is not None else load_migrations()
        self.command(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version UInt32, name String, "
            "checksum String, applied_at DateTime64(3, 'UTC')) "
            "ENGINE = ReplacingMergeTree ORDER BY version"
        )
        applied = {
            int(v): str(c)
            for v, c in self.query(f"SELECT version, checksum FROM {MIGRATIONS_TABLE} FINAL").rows
        }
        done = []
        for migration in todo:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after "
                        "it was applied",
                        hint="restore the file and put the change in a new numbered migration",
                    )
                continue
            for statement in migration.statements:
                try:
                    self.command(statement)
                except WarehouseError as exc:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                    ) from exc
            self.insert(
                MIGRATIONS_TABLE,
                [(migration.version, migration.name, migration.checksum, _now())],
                ["version", "name", "checksum", "applied_at"],
            )
            done.append(migration)
        return done

    def tables(self) -> list[str]:
        rows = self.query(
            "SELECT name FROM system.tables WHERE database = {db:String} ORDER BY name",
            {"db": self.database},
        ).rows
        return [str(r[0]) for r in rows]

    # --- data -----------------------------------------------------------------------
    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        try:
            with self._lock:
                self.client.command(sql, parameters=parameters)
        except ClickHouseError as exc:
            raise WarehouseError(_first_line(exc)) from exc

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        try:
            with self._lock:
                result = self.client.query(sql, parameters=parameters)
        except ClickHouseError as exc:
            raise WarehouseError(_first_line(exc)) from exc
        return QueryResult(list(result.column_names), [tuple(r) for r in result.result_rows])

    def insert(self, table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str]) -> int:
        """Insert rows; return how many were written. Every table is partitioned by the
        day of its time column, and ClickHouse refuses one INSERT touching more than
        ``max_partitions_per_insert_block`` (100) partitions, so a batch spanning more days
        (a backfill of years) goes in as several INSERTs of at most that many days each."""
        if not rows:
            return 0
        names = list(column_names)
        key = next((names.index(c) for c in PARTITION_COLUMNS if c in names), None)
        blocks = [list(rows)] if key is None else partition_blocks(rows, key)
        try:
            with self._lock:
                for block in blocks:
                    self.client.insert(table, block, column_names=names)
        except ClickHouseError as exc:
            raise WarehouseError(f"insert into {table} failed: {_first_line(exc)}") from exc
        return len(rows)


PARTITION_COLUMNS = ("window_start", "ts")  # PARTITION BY toDate(<this>) in the DDL
MAX_PARTITIONS_PER_INSERT = 100  # ClickHouse's max_partitions_per_insert_block default


def partition_blocks(
    rows: Sequence[Sequence[Any]], key: int, limit: int = MAX_PARTITIONS_PER_INSERT
) -> list[list[Sequence[Any]]]:
    """Rows grouped into blocks that each touch at most ``limit`` days of column ``key``
    (the table's partitions); one block when the rows span no more than that.

    >>> t0 = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    >>> days = [(t0 + dt.timedelta(days=i % 250),) for i in range(500)]
    >>> [len(b) for b in partition_blocks(days, 0)]
    [200, 200, 100]
    >>> len(partition_blocks(days[:10], 0))
    1
    """
    by_day: dict[Any, list[Sequence[Any]]] = {}
    for row in rows:
        value = row[key]
        by_day.setdefault(value.date() if isinstance(value, dt.datetime) else value, []).append(row)
    if len(by_day) <= limit:
        return [list(rows)]
    days = list(by_day.values())
    return [[r for day in days[i : i + limit] for r in day] for i in range(0, len(days), limit)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def run_query(settings: Settings, sql: str) -> QueryResult:
    """Run ``sql`` on the warehouse; when a running worker owns the embedded chDB, through
    that worker's ``/query`` endpoint (the only process that may open it)."""
    try:
        with Warehouse.connect(settings) as warehouse:
            return warehouse.query(sql)
    except WarehouseLockedError as locked:
        request = urllib.request.Request(
            f"http://{settings.web_host}:{settings.web_port}/query",
            data=json.dumps({"sql": sql}).encode(),
            method="POST",
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(
                request, timeout=max(60.0, settings.request_timeout_s)
            ) as r:
                data = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise WarehouseError(f"query failed: {exc.read().decode()[:500]}") from None
        except OSError:  # no worker of ours answers: someone else holds the lock
            raise locked from None
        return QueryResult(data["columns"], [tuple(row) for row in data["rows"]])
