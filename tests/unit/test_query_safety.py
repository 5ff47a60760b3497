"""The pure checks of /query: token, origin, content type, and the SQL as ClickHouse parses it."""

from __future__ import annotations

import pytest

from streamml.errors import WarehouseError
from streamml.queryclient import _error
from streamml.querysafety import (
    QueryRefused,
    authorized,
    bare_words,
    json_content_type,
    origin_refusal,
    own_origins,
    parse_ast,
    sql_refusal,
)

# EXPLAIN AST of "SELECT * FROM file('x')", as chDB 26.9 prints it
FILE_AST = """SelectWithUnionQuery (children 2)
 ExpressionList (children 1)
  SelectQuery (children 3)
   ExpressionList (children 1)
    Asterisk
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      Function FILE (children 1)
       ExpressionList (children 1)
        Literal 'x'
   Set
 Identifier Native""".splitlines()


def test_token_must_match_exactly() -> None:
    assert authorized("Bearer abc", "abc") and authorized("bearer  abc ", "abc")
    for header in (None, "", "Bearer", "Bearer abd", "Basic abc", "abc", "Bearer abcd"):
        assert not authorized(header, "abc")


def test_only_json_and_own_origin() -> None:
    assert json_content_type("Application/JSON; charset=utf-8")
    assert not any(map(json_content_type, (None, "text/plain", "application/x-www-form")))
    own = own_origins("127.0.0.1", 6066)
    assert origin_refusal("http://localhost:6066", None, own) is None
    assert origin_refusal(None, None, own) is None
    assert origin_refusal("http://localhost:8000", None, own)  # another port: another origin
    assert origin_refusal("null", None, own)
    assert origin_refusal(None, "cross-site", own) and origin_refusal(None, "same-site", own)


def test_table_functions_are_found_in_the_parsed_statement() -> None:
    assert sql_refusal("x", parse_ast(FILE_AST), False) == (
        "table function file() reaches files, URLs or other servers"
    )
    assert sql_refusal("x", parse_ast(FILE_AST), True) is None
    safe = [line.replace("FILE", "numbers") for line in FILE_AST]
    assert sql_refusal("x", parse_ast(safe), False) is None
    unknown = [line.replace("FILE", "someNewConnector") for line in FILE_AST]
    assert "someNewConnector".lower() in str(sql_refusal("x", parse_ast(unknown), False))


@pytest.mark.parametrize(
    "ast",
    [["DropQuery  t"], ["Set"], ["KillQueryQuery (children 1)"], ["Explain", " InsertQuery"]],
)
def test_only_reads_pass(ast: list[str]) -> None:
    assert "only SELECT" in str(sql_refusal("x", parse_ast(ast), True))


def test_into_outfile_is_found_by_the_parser_and_by_the_words() -> None:
    outfile_ast = ["SelectWithUnionQuery", " ExpressionList", " Literal 'x'", " Set"]
    assert sql_refusal("x", parse_ast(outfile_ast), True) == "INTO OUTFILE writes a file"
    plain = parse_ast(["SelectWithUnionQuery", " ExpressionList"])
    assert sql_refusal("SELECT 1 INTO/**/OutFile 'f'", plain, True) == "INTO OUTFILE writes a file"
    assert sql_refusal("SELECT 'into outfile' -- outfile", plain, True) is None


def test_words_skip_what_clickhouse_skips_and_nothing_more() -> None:
    assert list(bare_words("SELECT $t$ outfile $t$, `outfile`, \"outfile\", 'it''s'")) == ["SELECT"]
    # an unclosed comment or heredoc hides nothing
    assert "outfile" in list(bare_words("SELECT /* x outfile"))
    assert "outfile" in list(bare_words("SELECT $$ x outfile"))
    # the client would run this as a command although ClickHouse reads a SELECT
    plain = parse_ast(["SelectWithUnionQuery", " ExpressionList"])
    assert sql_refusal("/* /* */ SET max_threads = 1 */ SELECT 1", plain, True)


def test_client_maps_refusals_to_what_to_set() -> None:
    err = _error(401, b'{"error": "missing or wrong bearer token"}')
    assert isinstance(err, QueryRefused) and "STREAMML_QUERY_TOKEN" in str(err.hint)
    assert not err.retriable
    err = _error(403, b'{"error": "refused: table function url() reaches files"}')
    assert "STREAMML_QUERY_TABLE_FUNCTIONS" in str(err.hint)
    assert "application/json" in str(_error(415, b"{}").hint)
    failed = _error(400, b'{"error": "Code: 60. Unknown table"}')
    assert isinstance(failed, WarehouseError) and not failed.retriable
