"""Record types, spec-derived validators and the ClickHouse DDL. Imports nothing of streamml."""
