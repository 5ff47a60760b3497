"""docker-compose.yml cannot run here (no Docker engine), so check it against the code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from streamml.config import NON_SETTING_ENV, Settings, env_name
from streamml.schemas.migrations import CORE_TABLES, created_tables, load_migrations

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_services_are_kafka_clickhouse_and_worker() -> None:
    assert set(_compose()["services"]) == {"kafka", "clickhouse", "worker"}


def test_worker_env_names_are_settings_and_validate() -> None:
    worker_env = _compose()["services"]["worker"]["environment"]
    known = {env_name(f) for f in Settings.model_fields} | NON_SETTING_ENV
    assert set(worker_env) <= known
    values = {k.removeprefix("STREAMML_").lower(): v for k, v in worker_env.items()}
    settings = Settings(**values)
    assert settings.bootstrap_servers == "kafka:9092"
    assert not settings.embedded_warehouse


def test_ports_agree_with_settings() -> None:
    services = _compose()["services"]
    worker_env = services["worker"]["environment"]
    assert (
        f"127.0.0.1:{worker_env['STREAMML_WEB_PORT']}:{worker_env['STREAMML_WEB_PORT']}"
        in (services["worker"]["ports"])
    )
    host, port = worker_env["STREAMML_KAFKA_BOOTSTRAP"].split(":")
    assert (
        host == "kafka"
        and f"PLAINTEXT://kafka:{port}"
        in (services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"])
    )
    # the host-facing listener is the dev stack's default port, so the same clients work
    assert (
        f"127.0.0.1:{Settings.model_fields['kafka_port'].default}"
        in (services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"])
    )
    dsn = worker_env["STREAMML_CLICKHOUSE_DSN"]
    assert dsn.startswith("http://") and dsn.rsplit(":", 1)[1] in str(
        services["clickhouse"]["ports"]
    )


def test_clickhouse_mounts_the_same_ddl() -> None:
    clickhouse = _compose()["services"]["clickhouse"]
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in clickhouse["volumes"] if v.startswith("./")
    )
    assert mounts["./streamml/schemas/sql"] == "/streamml-ddl"
    init = (ROOT / mounts["./docker/clickhouse-init.sh"].removeprefix("/")).exists() or (
        ROOT / "docker" / "clickhouse-init.sh"
    ).exists()
    assert init
    assert "/streamml-ddl/*.sql" in (ROOT / "docker" / "clickhouse-init.sh").read_text()
    assert (
        clickhouse["environment"]["STREAMML_CLICKHOUSE_DATABASE"]
        == (_compose()["services"]["worker"]["environment"]["STREAMML_CLICKHOUSE_DATABASE"])
    )
    assert set(CORE_TABLES) <= set(created_tables(load_migrations()))


def test_no_secret_is_written_in_the_compose_file() -> None:
    """Passwords come from .env (scripts/compose-env.sh), the worker's other secrets are
    generated on its volume, and every published port is on loopback."""
    services = _compose()["services"]
    worker_env = services["worker"]["environment"]
    assert ":" not in worker_env["STREAMML_CLICKHOUSE_DSN"].split("//", 1)[1].split("@")[0]
    for value in (
        worker_env["STREAMML_CLICKHOUSE_PASSWORD"],
        services["clickhouse"]["environment"]["CLICKHOUSE_PASSWORD"],
    ):
        assert value.startswith("${STREAMML_CLICKHOUSE_PASSWORD:?")
    assert worker_env["STREAMML_SECRETS_DIR"].startswith(worker_env["STREAMML_STATE_DIR"])
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:")
    assert ".env" in (ROOT / ".gitignore").read_text().split()
