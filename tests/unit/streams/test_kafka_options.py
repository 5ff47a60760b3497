"""Every Kafka client's security options come from one place: ``client_options``."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from faust.auth import SASLCredentials, SSLCredentials

from streamml.config import load_settings
from streamml.devstack.tls import ensure_dev_tls
from streamml.devstack.worker import settings_env
from streamml.errors import ConfigError
from streamml.streams.kafka import client_options, faust_credentials, kafka_security


def test_plaintext_by_default_adds_nothing_but_the_protocol(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, secrets_dir=tmp_path / "s")
    assert client_options(settings) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(settings) is None
    assert not (tmp_path / "s").exists()  # no password generated for plaintext


def test_dev_security_defaults_to_sasl_ssl_with_the_generated_password(tmp_path: Path) -> None:
    secrets = tmp_path / "s"
    ensure_dev_tls(secrets / "kafka")
    settings = load_settings(state_dir=tmp_path, secrets_dir=secrets, kafka_dev_security=True)
    options = client_options(settings)
    password = (secrets / "kafka" / "password").read_text()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "streamml"
    assert options["sasl_plain_password"] == password and len(password) == 64
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    credentials = faust_credentials(settings)
    assert isinstance(credentials, SASLCredentials) and credentials.ssl_context is not None
    assert password not in repr(kafka_security(settings)) + repr(credentials)


def test_explicit_settings_win_over_the_dev_defaults(tmp_path: Path) -> None:
    tls = ensure_dev_tls(tmp_path / "tls")
    settings = load_settings(
        state_dir=tmp_path,
        secrets_dir=tmp_path / "s",
        kafka_dev_security=True,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=tls.ca_cert,
    )
    options = client_options(settings)
    assert options["security_protocol"] == "SSL" and "sasl_plain_password" not in options
    assert isinstance(faust_credentials(settings), SSLCredentials)


def test_sasl_without_a_user_is_a_config_error(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, kafka_security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ConfigError, match="needs a SASL user and password"):
        client_options(settings)


def test_a_missing_ca_file_says_which_and_what_to_do(tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
        kafka_ssl_cafile=tmp_path / "nope.crt",
    )
    with pytest.raises(ConfigError, match=r"nope\.crt") as err:
        client_options(settings)
    assert err.value.hint and "STREAMML_KAFKA_SSL_CAFILE" in err.value.hint


def test_child_processes_get_secret_values_not_masks(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, kafka_sasl_password="s3cret")
    env = settings_env(settings)
    assert env["STREAMML_KAFKA_SASL_PASSWORD"] == "s3cret"
    assert "*****" not in "".join(env.values())
