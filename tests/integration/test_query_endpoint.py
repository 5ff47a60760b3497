"""A live worker's /query: token, JSON, same origin, read-only, no file/URL/remote access."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamml.config import Settings
from streamml.devstack.worker import WorkerProcess
from streamml.secrets import query_token

from .helpers import pipeline_dir, worker_settings


@pytest.fixture(scope="module")
def worker(
    stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("query")
    folder = pipeline_dir(tmp, "demo", "queryguard")
    settings = worker_settings(stack_settings, tmp, folder, "queryguard")
    settings = settings.model_copy(update={"secrets_dir": tmp / "secrets"})
    proc = WorkerProcess(settings, ["queryguard"], tmp / "worker.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def post(
    worker: WorkerProcess,
    body: bytes,
    headers: dict[str, str],
    method: str = "POST",
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON answer and headers of one raw request to /query."""
    request = urllib.request.Request(
        worker.base + "/query", data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw), dict(exc.headers)
        except ValueError:  # the web server's own plain-text answers (405)
            return exc.code, {"text": raw.decode()}, dict(exc.headers)


def ask(worker: WorkerProcess, sql: str, **extra: str) -> tuple[int, dict[str, Any]]:
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {query_token(worker.settings)}",
        **extra,
    }
    status, data, _ = post(worker, json.dumps({"sql": sql}).encode(), headers)
    return status, data


def test_no_token_and_wrong_token_are_401_naming_the_setting(worker: WorkerProcess) -> None:
    token = query_token(worker.settings)
    body = json.dumps({"sql": "SELECT 1"}).encode()
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
        status, data, headers = post(worker, body, {"Content-Type": "application/json", **auth})
        assert status == 401, data
        assert "STREAMML_QUERY_TOKEN" in data["hint"]
        assert token not in json.dumps(data)
        assert not any(h.lower().startswith("access-control") for h in headers)


def test_text_plain_is_415_and_cross_origin_is_403(worker: WorkerProcess) -> None:
    auth = {"Authorization": f"Bearer {query_token(worker.settings)}"}
    body = json.dumps({"sql": "SELECT 1"}).encode()
    status, data, _ = post(worker, body, {"Content-Type": "text/plain", **auth})
    assert status == 415 and "application/json" in data["hint"]
    status, data = ask(worker, "SELECT 1", Origin="http://evil.example")
    assert status == 403 and "cross-origin" in data["error"], data
    status, data = ask(worker, "SELECT 1", **{"Sec-Fetch-Site": "cross-site"})
    assert status == 403, data
    # a browser's preflight gets no CORS headers, so a page can never read an answer
    status, _, headers = post(worker, b"", {"Origin": "http://evil.example"}, method="OPTIONS")
    assert status >= 400
    assert not any(h.lower().startswith("access-control") for h in headers)
    own = f"http://127.0.0.1:{worker.settings.web_port}"
    assert ask(worker, "SELECT 1", Origin=own)[0] == 200


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "select * from FILE ( '/etc/hostname' , 'LineAsString' )",
        "SELECT * FROM \"file\"('/etc/hostname', 'LineAsString')",
        "SELECT * FROM `file`('/etc/hostname', 'LineAsString')",
        "SELECT * FROM /* x */ file -- y\n('/etc/hostname', 'LineAsString')",
        "SELECT file('/etc/hostname')",
        "SELECT 1 WHERE 1 IN (SELECT * FROM view(SELECT * FROM file('/etc/hostname')))",
        "SELECT * FROM url('http://127.0.0.1:1/', 'CSV', 'a String')",
        "SELECT * FROM remote('127.0.0.1', system.one)",
        "SELECT * FROM s3('http://127.0.0.1:1/b/k', 'CSV', 'a String')",
        "SELECT * FROM filesystem('/etc')",
        "DESCRIBE TABLE file('/etc/hostname', 'LineAsString')",
    ],
)
def test_table_functions_reaching_outside_are_403(worker: WorkerProcess, sql: str) -> None:
    status, data = ask(worker, sql)
    assert status == 403, data
    assert "reaches files, URLs or other servers" in data["error"]
    assert "STREAMML_QUERY_TABLE_FUNCTIONS" in data["hint"]


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO FUNCTION file('{out}', 'CSV') SELECT 42",
        "SELECT 42 INTO OUTFILE '{out}'",
        "SELECT $$ it's $$ INTO /* */ outfile '{out}' FORMAT CSV",
        "(SELECT 42) INTO OUTFILE '{out}' TRUNCATE",
        "DROP TABLE predictions",
        "TRUNCATE TABLE predictions",
        "ALTER TABLE predictions DELETE WHERE 1",
        "CREATE TABLE evil (a UInt8) ENGINE = Memory",
        "INSERT INTO predictions SELECT * FROM predictions",
        "SET readonly = 0",
        "SYSTEM DROP DNS CACHE",
        "KILL QUERY WHERE 1",
        "EXPLAIN INSERT INTO predictions SELECT * FROM predictions",
        "/* /* */ SET max_threads = 1 */ SELECT 1",
        "SELECT 1; DROP TABLE predictions",
    ],
)
def test_writes_are_refused_and_nothing_changes(
    worker: WorkerProcess, tmp_path: Path, sql: str
) -> None:
    out = tmp_path / "out.csv"
    tables = "SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name"
    before = ask(worker, tables)
    assert before[0] == 200 and ["predictions"] in before[1]["rows"], before
    status, data = ask(worker, sql.format(out=out))
    assert status in (400, 403), data
    assert not out.exists()
    assert ask(worker, tables) == before


def test_an_authorized_select_reads_and_the_tables_are_intact(worker: WorkerProcess) -> None:
    status, data = ask(worker, "SELECT count() FROM system.tables WHERE name = 'predictions'")
    assert (status, data["rows"]) == (200, [[1]])
    status, data = ask(worker, "SELECT number * 2 AS n FROM numbers(3) ORDER BY n")
    assert (status, data["columns"], data["rows"]) == (200, ["n"], [[0], [2], [4]])
    assert worker.query("SELECT count() >= 0 FROM predictions")[1] == [[1]]
    assert ask(worker, "SHOW TABLES")[0] == 200


def test_other_endpoints_reveal_no_token(worker: WorkerProcess) -> None:
    token = query_token(worker.settings)
    for path in ("/health", "/stats", "/metrics"):
        with urllib.request.urlopen(worker.base + path, timeout=10) as response:
            assert token not in response.read().decode()
