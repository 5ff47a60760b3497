from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamml.schemas.migrations import (
    CORE_TABLES,
    created_tables,
    load_migrations,
    split_statements,
)


def test_migrations_are_ordered_and_create_every_core_table() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
    assert sorted(created_tables(migrations)) == sorted(CORE_TABLES)


def test_checksums_change_with_the_text() -> None:
    [first, *_] = load_migrations()
    assert len(first.checksum) == 64
    assert first.checksum != type(first)(first.version, first.name, first.sql + " ").checksum


def test_predictions_dedupe_key_is_pipeline_version_event() -> None:
    sql = load_migrations()[0].sql
    block = sql[sql.index("CREATE TABLE IF NOT EXISTS predictions") :]
    block = block[: block.index(";")]
    assert "ReplacingMergeTree" in block
    assert "ORDER BY (pipeline, model_version, ts, event_id)" in block


statement = st.from_regex(r"SELECT [a-z0-9 ,]{1,20}", fullmatch=True)


@given(st.lists(statement, min_size=1, max_size=8), st.booleans())
def test_split_statements_round_trips(statements: list[str], comments: bool) -> None:
    lines = []
    for text in statements:
        if comments:
            lines.append("-- a comment; with a semicolon;")
        lines.append(text + ";")
    assert split_statements("\n".join(lines)) == [s.strip() for s in statements]
