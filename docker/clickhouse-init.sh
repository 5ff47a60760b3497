#!/bin/bash
# Applies streamml's migrations (mounted read-only at /streamml-ddl) when the ClickHouse
# container first starts. The worker applies the same files at start and records them.
set -euo pipefail
db=${STREAMML_CLICKHOUSE_DATABASE:-streamml}
clickhouse client -u "${CLICKHOUSE_USER:-default}" --password "${CLICKHOUSE_PASSWORD:-}" \
  --query "CREATE DATABASE IF NOT EXISTS ${db}"
for f in /streamml-ddl/*.sql; do
  echo "applying ${f}"
  clickhouse client -u "${CLICKHOUSE_USER:-default}" --password "${CLICKHOUSE_PASSWORD:-}" \
    --database "${db}" --multiquery < "${f}"
done
