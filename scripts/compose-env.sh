#!/bin/bash
# Writes .env for docker-compose once: a random ClickHouse password (mode 0600, not
# tracked by git). Run it before the first `docker compose up`; it never overwrites.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -e .env ]] && grep -q '^STREAMML_CLICKHOUSE_PASSWORD=' .env; then
  echo ".env already holds the ClickHouse password"
  exit 0
fi
umask 077
echo "STREAMML_CLICKHOUSE_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(24))')" >> .env
echo "wrote .env (mode 0600)"
