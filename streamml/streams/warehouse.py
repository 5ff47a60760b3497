"""The warehouse: ClickHouse through clickhouse-connect, embedded chDB by default.

One code path serves both: ``chdb:///abs/path`` opens chDB in this process (only
one process may own a path), ``http(s)://host:port`` talks to a ClickHouse server.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import re
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import (
    ClickHouseError,
    DataError,
    scrub_error_details,
)

from streamml.config import Settings, mask_dsn
from streamml.errors import (
    MigrationError,
    WarehouseError,
    WarehouseLockedError,
    WarehouseRefusedError,
)
from streamml.schemas.migrations import Migration, load_migrations
from streamml.secrets import clickhouse_password
from streamml.sql import Query

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
    if _chdb_path_in_this_process == path:
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
    if _chdb_path_in_this_process is not None:  # (owned by another process: said above)
        raise WarehouseError(
            f"this process already has the embedded warehouse {_chdb_path_in_this_process} "
            f"open; chDB cannot open a second path ({path})",
            hint="use one STREAMML_STATE_DIR / STREAMML_CLICKHOUSE_DSN per process",
        )
    _chdb_path_in_this_process = path


def _open_client(
    dsn: str, database: str | None, password: str | None = None, ca_file: Path | None = None
) -> Client:
    """A client of the DSN. For a server, ``password`` (from STREAMML_CLICKHOUSE_PASSWORD or
    its file) replaces one in the DSN, and an https DSN verifies the server against
    ``ca_file`` when given (else the system's CAs). No error text carries the password."""
    parts = urlsplit(dsn)
    try:
        if parts.scheme == "chdb":
            path = parts.path
            if path and path != "memory":
                Path(path).mkdir(parents=True, exist_ok=True)
                _check_chdb_path(path)
            return clickhouse_connect.get_client(dsn=dsn, database=database or "")
        options: dict[str, Any] = {}
        if password is not None:
            options["password"] = password
        if parts.scheme in ("https", "clickhouses"):
            options["verify"] = True
            if ca_file is not None:
                options["ca_cert"] = str(ca_file)
        return clickhouse_connect.get_client(
            dsn=dsn,
            database=database or "",
            connect_timeout=10,
            send_receive_timeout=60,
            **options,
        )
    except WarehouseError:
        raise
    except Exception as exc:  # the drivers raise a mix of their own and OS errors
        text = (str(exc) or type(exc).__name__).splitlines()[0][:300]
        for secret in (password, parts.password):
            if secret:
                text = text.replace(secret, "***")
        raise WarehouseError(
            f"cannot connect to the warehouse {mask_dsn(dsn)}: {text}",
            hint="check STREAMML_CLICKHOUSE_DSN and STREAMML_CLICKHOUSE_PASSWORD(_FILE)",
        ) from None


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
        password, ca_file = clickhouse_password(settings), settings.clickhouse_ca_file
        bootstrap = _open_client(dsn, None, password, ca_file)
        try:
            bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        except ClickHouseError as exc:
            raise WarehouseError(f"cannot create database {db!r}: {exc}") from exc
        client = (
            _open_client(dsn, db, password, ca_file)
            if urlsplit(dsn).scheme != "chdb"
            else bootstrap
        )
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

    def query(
        self, sql: str, parameters: dict[str, Any] | None = None, *, readonly: int = 0
    ) -> QueryResult:
        """Run a query; ``readonly`` (1 or 2) runs it under ClickHouse's ``readonly``
        setting, for this query only, so the engine refuses writes and DDL."""
        settings = {"readonly": readonly} if readonly else None
        try:
            with self._lock:
                result = self.client.query(sql, parameters=parameters, settings=settings)
        except ClickHouseError as exc:
            raise WarehouseError(_first_line(exc)) from exc
        return QueryResult(list(result.column_names), [tuple(r) for r in result.result_rows])

    def insert(self, table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str]) -> int:
        """Insert rows; return how many were written. Every table is partitioned by the
        day of its time column, and ClickHouse refuses one INSERT touching more than
        ``max_partitions_per_insert_block`` (100) partitions, so a batch spanning more days
        (a backfill of years) goes in as several INSERTs of at most that many days each.

        Raises :class:`WarehouseRefusedError` when ClickHouse refuses the data itself, and a
        retriable :class:`WarehouseError` when it could not take it (down, restarting)."""
        if not rows:
            return 0
        key = _partition_key(column_names)
        for block in [list(rows)] if key is None else partition_blocks(rows, key):
            self._insert_block(table, block, column_names)
        return len(rows)

    def insert_isolating(
        self, table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str]
    ) -> list[Refusal]:
        """Insert rows, leaving out those ClickHouse refuses for themselves: write the rest
        and return the refused ones (their index in ``rows`` and the server's reason).
        A failure that is not about the data (server down) raises, as :meth:`insert` does."""
        key = _partition_key(column_names)
        indexes = list(range(len(rows)))
        if key is None:
            blocks = [indexes]
        else:  # the same blocks as insert(), as indexes into rows
            tagged = [(i, rows[i][key]) for i in indexes]
            blocks = [[i for i, _ in block] for block in partition_blocks(tagged, 1)]
        refused: list[Refusal] = []
        for block in blocks:
            refused += isolate_refused(
                block, lambda part: self._insert_block(table, [rows[i] for i in part], column_names)
            )
        return sorted(refused, key=lambda r: r.index)

    def _insert_block(
        self, table: str, block: Sequence[Sequence[Any]], column_names: Sequence[str]
    ) -> None:
        try:
            with self._lock:
                self.client.insert(table, block, column_names=list(column_names))
        except _DATA_FAULTS as exc:  # raised while encoding the rows: the data is at fault
            raise WarehouseRefusedError(
                f"insert into {table} refused: {_first_line(exc)}", reason=_reason(exc)
            ) from exc
        except ClickHouseError as exc:
            if refuses_data(exc):
                raise WarehouseRefusedError(
                    f"insert into {table} refused: {_first_line(exc)}", reason=_reason(exc)
                ) from exc
            raise _retriable(f"insert into {table} failed: {_first_line(exc)}") from exc
        except Exception as exc:  # e.g. the embedded engine failing: retry, never lose rows
            raise _retriable(f"insert into {table} failed: {_first_line(exc)}") from exc


@dataclass(frozen=True)
class Refusal:
    """A row ClickHouse refused: its index in the rows given, and the server's reason."""

    index: int
    reason: str


def isolate_refused(
    indexes: Sequence[int], write: Callable[[Sequence[int]], None]
) -> list[Refusal]:
    """Write the rows at ``indexes``; when the warehouse refuses a group, split it in halves
    until each refused row stands alone. Return the refused rows; the others are written.
    ``k`` bad rows among ``n`` cost about ``k * log2(n)`` extra writes.

    >>> def write(part):
    ...     if 3 in part:
    ...         raise WarehouseRefusedError("no", reason="row 3 is bad")
    ...     written.extend(part)
    >>> written = []
    >>> isolate_refused(range(6), write), sorted(written)
    ([Refusal(index=3, reason='row 3 is bad')], [0, 1, 2, 4, 5])
    """
    refused: list[Refusal] = []
    todo = [list(indexes)] if indexes else []
    while todo:
        part = todo.pop()
        try:
            write(part)
        except WarehouseRefusedError as exc:
            if len(part) == 1:
                refused.append(Refusal(part[0], exc.reason))
            else:
                half = len(part) // 2
                todo += [part[half:], part[:half]]  # the first half is written first
    return refused


# ClickHouse error codes caused by the data of an INSERT, not by the server's state.
DATA_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        190,  # SIZES_OF_ARRAYS_DONT_MATCH
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        407,  # DECIMAL_OVERFLOW
        469,  # VIOLATED_CONSTRAINT
    }
)
TOO_MANY_PARTS = 252  # about the data only as "Too many partitions for single INSERT block"
# What clickhouse-connect raises (DataError, or plain Python errors) when it cannot encode
# a value into its column's type, before anything reaches the server.
_DATA_FAULTS = (DataError, ValueError, TypeError, OverflowError, struct.error)
_CODE = re.compile(r"\bCode:\s*(\d+)")


def refuses_data(exc: BaseException) -> bool:
    """Whether a ClickHouse error is about the rows sent (the same rows fail again; fewer
    rows may not), rather than about the server's state (a retry may succeed).

    >>> from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
    >>> refuses_data(DatabaseError("Code: 349. DB::Exception: Cannot insert NULL value"))
    True
    >>> refuses_data(DatabaseError("Code: 241. DB::Exception: Memory limit exceeded"))
    False
    >>> refuses_data(OperationalError("Error HTTPConnectionPool: Connection refused"))
    False
    """
    if isinstance(exc, DataError):
        return True
    code = getattr(exc, "code", None)
    if code is None:
        found = _CODE.search(str(exc))
        code = int(found.group(1)) if found else None
    if code == TOO_MANY_PARTS:  # smaller blocks go in; a single row always fits
        return "Too many partitions for single INSERT block" in str(exc)
    return code in DATA_ERROR_CODES


def _retriable(message: str) -> WarehouseError:
    """A failure of the warehouse rather than of the data: the same rows may go in later."""
    error = WarehouseError(message)
    error.retriable = True
    return error


def _partition_key(column_names: Sequence[str]) -> int | None:
    """The position of the column the table is partitioned by, if it has one."""
    names = list(column_names)
    return next((names.index(c) for c in PARTITION_COLUMNS if c in names), None)


def _reason(exc: BaseException) -> str:
    """The whole message of a refusal, with what caused it, for a dead letter."""
    text = scrub_error_details(str(exc).strip()) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text[:REASON_CHARS]


REASON_CHARS = 2_000


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


def run_query(
    settings: Settings, sql: str, parameters: dict[str, Any] | None = None
) -> QueryResult:
    """Run ``sql`` (with ``{name:Type}`` ``parameters``, bound server-side) on the
    warehouse; when a running worker owns the embedded chDB, through that worker's
    ``/query`` endpoint (the only process that may open it), which takes text only: the
    parameters are then written in as escaped literals (:meth:`streamml.sql.Query.render`)."""
    try:
        with Warehouse.connect(settings) as warehouse:
            return warehouse.query(sql, parameters)
    except WarehouseLockedError as locked:
        from streamml.queryclient import query_worker  # it imports this module

        text = Query(sql, dict(parameters)).render() if parameters else sql
        try:
            columns, rows = query_worker(settings, text, max(60.0, settings.request_timeout_s))
        except OSError:  # no worker of ours answers: someone else holds the lock
            raise locked from None
        return QueryResult(columns, [tuple(row) for row in rows])
