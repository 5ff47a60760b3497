"""What the worker's ``/query`` endpoint accepts: pure checks of the request and the SQL.

The endpoint runs SQL in the process that owns the warehouse, so it is guarded in layers:
a bearer token, a JSON content type and same-origin requests only (a web page cannot
reach it from a browser), the engine's ``readonly`` setting, and :func:`sql_refusal`,
which reads the statement as ClickHouse parsed it (``EXPLAIN AST``) and refuses anything
but reads, table functions that reach files, URLs or other servers, and ``INTO OUTFILE``.

>>> authorized("Bearer s3cret", "s3cret"), authorized("Bearer wrong", "s3cret")
(True, False)
>>> origin_refusal("http://evil.example", None, {"http://127.0.0.1:6066"})
"cross-origin request from 'http://evil.example' refused"
>>> json_content_type("application/json; charset=utf-8"), json_content_type("text/plain")
(True, False)
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from clickhouse_connect.driver.query import command_re, remove_sql_comments

from streamml.errors import StreamMLError


class Answers(Protocol):
    """What :func:`run_read_only` needs of a query result (``QueryResult``)."""

    @property
    def rows(self) -> Any: ...


R = TypeVar("R", bound=Answers)

# The engine setting the user's SQL runs under: 1 refuses writes, DDL, SET and every
# table function but the built-in generators; 2 (with table functions allowed) lets reads
# through table functions run, and still refuses writes to tables and DDL.
READONLY = 1
READONLY_WITH_TABLE_FUNCTIONS = 2

# Table functions that compute rows or read this server's own tables: always allowed.
SAFE_TABLE_FUNCTIONS = frozenset(
    {
        "format",
        "generate_series",
        "generaterandom",
        "generateseries",
        "merge",
        "null",
        "numbers",
        "numbers_mt",
        "primes",
        "values",
        "view",
        "zeros",
        "zeros_mt",
    }
)
# Functions that reach outside the database wherever they appear (``file`` is also a
# plain function that returns a file's content); any other table function is refused
# in table position too, so one added by a newer engine is refused by default.
EXTERNAL_FUNCTIONS = frozenset(
    {
        "azureblobstorage",
        "azureblobstoragecluster",
        "cluster",
        "clusterallreplicas",
        "deltalake",
        "dictionary",
        "eval",
        "executable",
        "file",
        "filecluster",
        "filesystem",
        "gcs",
        "hdfs",
        "hdfscluster",
        "hudi",
        "iceberg",
        "input",
        "jdbc",
        "mongodb",
        "mysql",
        "odbc",
        "oss",
        "postgresql",
        "python",
        "redis",
        "remote",
        "remotesecure",
        "s3",
        "s3cluster",
        "sqlite",
        "url",
        "urlcluster",
        "ytsaurus",
    }
)
# Statements (AST node kinds) that only read; everything else is refused before it runs.
READ_STATEMENTS = frozenset(
    {"SelectWithUnionQuery", "SelectIntersectExceptQuery", "SelectQuery", "Explain"}
) | {"ShowTables", "DescribeQuery", "ExistsTableQuery", "ExistsDatabaseQuery"}
_WITH_OUTPUT = READ_STATEMENTS - {"SelectQuery"}  # a Literal child of these is INTO OUTFILE
_CLAUSES = frozenset({"TablesInSelectQuery"})  # named like a statement, part of a SELECT


class QueryRefused(StreamMLError, PermissionError):
    """The /query endpoint refused a request or its SQL; the same request fails again.
    ``status`` is the HTTP status it answers with."""

    def __init__(self, message: str, *, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


def run_read_only(
    query_fn: Callable[..., R],
    sql: str,
    parameters: dict[str, Any] | None = None,
    *,
    table_functions: bool = False,
) -> R:
    """Run ``sql`` with ``query_fn`` (``Warehouse.query``: text, parameters, ``readonly=``)
    the one way every user-facing path does (``/query``, ``streamml query``, ``streamml
    ask``): ClickHouse parses it (``EXPLAIN AST``), :func:`sql_refusal` must find nothing
    wrong (a :class:`QueryRefused` says why), and it runs under the ``readonly`` setting.
    Writes are refused before they run, so no session ever executes one under
    ``readonly``."""
    readonly = READONLY_WITH_TABLE_FUNCTIONS if table_functions else READONLY
    lines = query_fn(f"EXPLAIN AST {sql}", parameters, readonly=readonly).rows
    why = sql_refusal(sql, parse_ast(str(row[0]) for row in lines), table_functions)
    if why is not None:
        hint = (
            "set STREAMML_QUERY_TABLE_FUNCTIONS=true to allow table functions"
            if "reaches files" in why
            else "queries only read; change the warehouse with streamml commands"
        )
        raise QueryRefused(f"refused: {why}", status=403, hint=hint)
    return query_fn(sql, parameters, readonly=readonly)


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time)."""
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def json_content_type(header: str | None) -> bool:
    """Whether a Content-Type is JSON (a browser cannot send it cross-origin unasked)."""
    return (header or "").split(";")[0].strip().lower() == "application/json"


def own_origins(host: str, port: int) -> set[str]:
    """The origins a page served by the worker itself would send (none is served today).

    >>> sorted(own_origins("127.0.0.1", 6066))[:2]
    ['http://127.0.0.1:6066', 'http://[::1]:6066']
    """
    hosts = {host}
    if host in {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"}:
        hosts |= {"127.0.0.1", "localhost", "[::1]"}
    return {f"http://{h if ':' not in h or h.startswith('[') else f'[{h}]'}:{port}" for h in hosts}


def origin_refusal(origin: str | None, fetch_site: str | None, allowed: set[str]) -> str | None:
    """Why a request is cross-origin (from a web page of another site), or None.

    >>> origin_refusal(None, "cross-site", set())
    'cross-site request refused (Sec-Fetch-Site: cross-site)'
    >>> origin_refusal("http://127.0.0.1:6066", "same-origin", {"http://127.0.0.1:6066"})
    """
    if origin is not None and origin.rstrip("/").lower() not in allowed:
        return f"cross-origin request from {origin[:100]!r} refused"
    site = (fetch_site or "").strip().lower()
    if site not in {"", "same-origin", "none"}:
        return f"cross-site request refused (Sec-Fetch-Site: {site[:30]})"
    return None


# --- the SQL ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One line of ``EXPLAIN AST``: its depth, kind and (for a function) name."""

    depth: int
    kind: str
    name: str


def parse_ast(lines: Iterable[str]) -> list[Node]:
    """The lines of ``EXPLAIN AST`` as nodes (depth is the indentation).

    >>> parse_ast(["SelectWithUnionQuery (children 1)", "  Function FILE (children 1)"])[1]
    Node(depth=2, kind='Function', name='file')
    """
    nodes = []
    for line in lines:
        stripped = line.lstrip(" ")
        words = stripped.split()
        if not words:
            continue
        name = words[1].lower() if words[0] == "Function" and len(words) > 1 else ""
        nodes.append(Node(len(line) - len(stripped), words[0], name))
    return nodes


def sql_refusal(sql: str, ast: list[Node], table_functions: bool) -> str | None:
    """Why ``sql`` (parsed by ClickHouse into ``ast``) may not run through /query, or None.
    ``table_functions``: whether table functions that reach outside are allowed.

    >>> ast = parse_ast(["SelectWithUnionQuery", " SelectQuery", "  TableExpression",
    ...                  "   Function url (children 1)"])
    >>> sql_refusal("SELECT * FROM url('http://x')", ast, False)
    'table function url() reaches files, URLs or other servers'
    >>> sql_refusal("SELECT * FROM url('http://x')", ast, True) is None
    True
    >>> sql_refusal("DROP TABLE t", parse_ast(["DropQuery  t"]), True)
    'only SELECT, SHOW TABLES, DESCRIBE, EXISTS and EXPLAIN run here, not DropQuery'
    """
    if not ast:
        return "empty statement"
    for i, node in enumerate(ast):
        statement = node.kind.endswith("Query") or node.kind == "Explain" or i == 0
        if statement and node.kind not in READ_STATEMENTS | _CLAUSES:
            return (
                f"only SELECT, SHOW TABLES, DESCRIBE, EXISTS and EXPLAIN run here, not {node.kind}"
            )
        if node.kind == "Literal" and _parent(ast, i) in _WITH_OUTPUT:
            return "INTO OUTFILE writes a file"
        if node.kind == "Function" and not table_functions:
            in_table = _parent(ast, i) == "TableExpression"
            if node.name in EXTERNAL_FUNCTIONS or (
                in_table and node.name not in SAFE_TABLE_FUNCTIONS
            ):
                kind = "table function" if in_table else "function"
                return f"{kind} {node.name}() reaches files, URLs or other servers"
    if "OUTFILE" in (w.upper() for w in bare_words(sql)):
        return "INTO OUTFILE writes a file"
    if command_re.search(remove_sql_comments(sql)):
        # clickhouse-connect would send it as a command (SET around it): refuse what the
        # client and the engine read differently (e.g. nested comments)
        return "the statement does not read as a query to the client"
    return None


def _parent(ast: list[Node], index: int) -> str:
    depth = ast[index].depth
    for node in reversed(ast[:index]):
        if node.depth < depth:
            return node.kind
    return ""


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    | (?P<line>(--|\#[ !]|\#$)[^\n]*)
    | (?P<block>/\*)
    | (?P<heredoc>\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*)?\$)
    | (?P<quoted>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def bare_words(sql: str) -> Iterator[str]:
    """The unquoted words of ``sql``: string literals, quoted identifiers, heredocs and
    comments (nested ``/* */`` as ClickHouse reads them) left out; an unclosed one hides
    nothing (the rest is read as words).

    >>> list(bare_words("SELECT 'INTO OUTFILE' /* outfile /* x */ */ -- outfile\\n, $$ a'b $$ x"))
    ['SELECT', 'x']
    >>> list(bare_words("select 1 into/**/OutFile 'f'"))
    ['select', 'into', 'OutFile']
    """
    pos = 0
    while pos < len(sql):
        m = _TOKEN.match(sql, pos)
        assert m is not None  # "other" matches any character
        pos = m.end()
        if m.lastgroup == "word":
            yield m.group()
        elif m.lastgroup == "block":
            end = _block_end(sql, pos)
            pos = end if end is not None else pos
        elif m.lastgroup == "heredoc":
            close = sql.find(m.group(), pos)
            pos = close + len(m.group()) if close >= 0 else pos


def _block_end(sql: str, pos: int) -> int | None:
    """Where the block comment opened just before ``pos`` ends (nesting counted)."""
    depth = 1
    while depth:
        opened, closed = sql.find("/*", pos), sql.find("*/", pos)
        if closed < 0:
            return None
        if 0 <= opened < closed:
            depth, pos = depth + 1, opened + 2
        else:
            depth, pos = depth - 1, closed + 2
    return pos
