from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamml.config import Settings, env_name, load_settings, mask_dsn
from streamml.errors import ConfigError


def test_defaults_use_the_local_broker_and_embedded_chdb(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    assert settings.uses_local_broker
    assert settings.bootstrap_servers == "127.0.0.1:19092"
    assert settings.warehouse_dsn == f"chdb://{tmp_path / 'chdb'}"
    assert settings.embedded_warehouse


def test_environment_overrides_and_external_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMML_KAFKA_BOOTSTRAP", "k1:9092, k2:9092")
    monkeypatch.setenv("STREAMML_CLICKHOUSE_DSN", "http://u:pw@ch:8123")
    settings = load_settings()
    assert not settings.uses_local_broker
    assert settings.bootstrap_servers == "k1:9092,k2:9092"
    assert not settings.embedded_warehouse
    assert settings.effective()["clickhouse_dsn"] == "http://u:***@ch:8123"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("STREAMML_KAFKA_PORT", "abc", "STREAMML_KAFKA_PORT"),
        ("STREAMML_KAFKA_PORT", "80", "greater than or equal to 1024"),
        ("STREAMML_LOG_LEVEL", "loud", "'debug', 'info', 'warning' or 'error'"),
        ("STREAMML_KAFKA_BOOTSTRAP", "no-port-here", "expected host:port"),
        ("STREAMML_CLICKHOUSE_DSN", "postgres://x", "is not supported"),
        ("STREAMML_CLICKHOUSE_DATABASE", "drop table;", "letters, digits and underscores"),
        ("STREAMML_KAFKA_CONTROLLER_PORT", "19092", "must differ"),
    ],
)
def test_bad_values_name_the_variable_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert expected in str(err.value)
    assert variable in str(err.value) or "must differ" in expected


def test_a_mistyped_variable_is_refused_with_a_suggestion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMML_KAFKA_BOOTSTRAPS", "k:9092")
    with pytest.raises(ConfigError, match="STREAMML_KAFKA_BOOTSTRAPS") as err:
        load_settings()
    assert err.value.hint == "did you mean STREAMML_KAFKA_BOOTSTRAP?"


def test_toml_file_is_read_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "streamml.toml"
    path.write_text("kafka_port = 29092\ntopic_partitions = 3\n")
    monkeypatch.setenv("STREAMML_CONFIG_FILE", str(path))
    monkeypatch.setenv("STREAMML_TOPIC_PARTITIONS", "2")
    settings = load_settings()
    assert settings.kafka_port == 29092
    assert settings.topic_partitions == 2


def test_toml_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMML_CONFIG_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()
    bad = tmp_path / "bad.toml"
    bad.write_text("kafka_prot = 1\n")
    monkeypatch.setenv("STREAMML_CONFIG_FILE", str(bad))
    with pytest.raises(ConfigError, match="unknown setting 'kafka_prot'"):
        load_settings()


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError):
        settings.kafka_port = 1  # type: ignore[misc]


def test_every_field_documents_its_variable() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description and field.description.startswith(env_name(name) + ":"), name


@given(
    user=st.from_regex(r"[a-z]{1,8}", fullmatch=True),
    password=st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True),
    port=st.integers(1, 65535),
)
def test_mask_dsn_never_shows_the_password(user: str, password: str, port: int) -> None:
    masked = mask_dsn(f"https://{user}:{password}@host.example:{port}/db")
    assert f":{password}@" not in masked
    assert masked == f"https://{user}:***@host.example:{port}/db"


def test_docs_configuration_is_the_generated_reference() -> None:
    from streamml.config import reference_markdown

    docs = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert docs.read_text() == reference_markdown(), (
        "regenerate with: streamml config --reference > docs/configuration.md"
    )


def test_effective_configuration_never_shows_a_secret(tmp_path: Path) -> None:
    from streamml.config import load_settings

    planted = {
        "query_token": "tok-5b1f0e",
        "kafka_sasl_password": "kafka-9c2d7a",
        "clickhouse_password": "ch-3e8a41",
        "model_signing_key": "sign-77d0c2",
        "pii_key": "pii-1a9f3b",
    }
    settings = load_settings(
        state_dir=tmp_path, clickhouse_dsn="https://u:dsn-4c4c@db:8443", **planted
    )
    shown = repr(settings.effective()) + repr(settings) + str(settings)
    for secret in [*planted.values(), "dsn-4c4c"]:
        assert secret not in shown
