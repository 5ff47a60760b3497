"""The ClickHouse DDL as versioned migrations (``sql/NNNN_name.sql``), parsed but not run.

Running them is the warehouse's job (:mod:`streamml.streams.warehouse`); this module
only knows the files, their order, their statements and their checksums.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

# The tables the architecture promises to users; a test keeps this list and the DDL in step.
CORE_TABLES = (
    "predictions",
    "labels",
    "metrics",
    "drift_events",
    "model_versions",
    "dead_letters",
    "features",
    "audit_events",
    "alerts",
    "annotations",
    "flags",
    "summaries",
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def statements(self) -> list[str]:
        return split_statements(self.sql)


def split_statements(sql: str) -> list[str]:
    """Split a SQL script on ``;`` at line ends, dropping ``--`` comment lines.

    >>> split_statements("-- c\\nCREATE TABLE a (x Int8) ENGINE=Memory;\\n\\nSELECT 1;\\n")
    ['CREATE TABLE a (x Int8) ENGINE=Memory', 'SELECT 1']
    """
    lines = [ln for ln in sql.splitlines() if not ln.lstrip().startswith("--")]
    statements, current = [], []
    for line in lines:
        current.append(line)
        if line.rstrip().endswith(";"):
            text = "\n".join(current).strip().rstrip(";").strip()
            if text:
                statements.append(text)
            current = []
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return statements


def load_migrations() -> list[Migration]:
    """All migrations shipped in the package, ordered by version."""
    found = []
    for entry in (resources.files("streamml.schemas") / "sql").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a version number: {versions}")
    return found


def created_tables(migrations: list[Migration]) -> list[str]:
    """Names of the tables the migrations create (for checks against compose and docs)."""
    pattern = re.compile(r"CREATE TABLE IF NOT EXISTS\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)
    return [name for m in migrations for name in pattern.findall(m.sql)]
