"""The dev broker with STREAMML_KAFKA_DEV_SECURITY: clients speak SASL/SCRAM over TLS.

This module starts its own broker (the session's is PLAINTEXT). The demo pipeline runs
end to end over SASL_SSL into ClickHouse, and a client without credentials, with TLS but
no SASL, or with a wrong password is refused with a clear error within its timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from streamml.config import Settings
from streamml.devstack import LocalBroker
from streamml.devstack.worker import WorkerProcess
from streamml.errors import BrokerUnavailableError
from streamml.models.synthetic import payments
from streamml.schemas.spec import load_spec
from streamml.secrets import kafka_sasl_password
from streamml.streams.kafka import ensure_pipeline_topics, kafka_security, produce
from streamml.streams.producer import produce_examples
from streamml.testing import isolated_settings

from .helpers import pipeline_dir, wait_for, worker_settings

NAME = "secure"
EVENTS = 300
REFUSAL_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def secure_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A dev broker of its own, SASL_SSL only, with secrets in a temporary dir."""
    home = tmp_path_factory.mktemp("secure")
    settings = isolated_settings(
        home / "state",
        kafka_dev_security=True,
        secrets_dir=home / "secrets",
        request_timeout_s=10.0,
    )
    broker = LocalBroker(settings)
    broker.up()
    try:
        yield settings
    finally:
        broker.down()


def _edit(spec: dict[str, Any]) -> None:
    spec.pop("batch_model")
    spec["serving"] = {"champion": "online", "challenger": "none"}
    spec["retrain"]["on_drift"] = False


def test_the_dev_broker_serves_sasl_ssl_only(secure_settings: Settings) -> None:
    security = kafka_security(secure_settings)
    assert (security.protocol, security.username) == ("SASL_SSL", "streamml")
    assert security.cafile == secure_settings.secrets_path / "kafka" / "ca.crt"
    server = (LocalBroker(secure_settings).home / "server.properties").read_text()
    assert "listeners=SASL_SSL://127.0.0.1:" in server
    assert "PLAINTEXT://127.0.0.1:" not in server.replace("CONTROLLER", "")
    status = LocalBroker(secure_settings).status()
    assert status.state == "running" and status.ready  # the probe authenticates too


def test_the_demo_pipeline_runs_over_sasl_ssl(secure_settings: Settings, tmp_path: Path) -> None:
    pipelines = pipeline_dir(tmp_path, "demo", NAME, _edit)
    settings = worker_settings(secure_settings, tmp_path, pipelines, "secure_app")
    spec = load_spec(pipelines / f"{NAME}.yaml")
    asyncio.run(ensure_pipeline_topics(settings, [spec]))
    worker = WorkerProcess(settings, [NAME], tmp_path / "worker.log")
    worker.start()
    try:
        asyncio.run(produce_examples(settings, spec, payments(EVENTS, seed=3)))
        where = f"WHERE pipeline = '{NAME}'"
        wait_for(worker, f"SELECT uniqExact(event_id) FROM predictions {where}", EVENTS)
        wait_for(worker, f"SELECT uniqExact(event_id) FROM labels {where}", EVENTS)
    finally:
        worker.stop()
    password = kafka_sasl_password(secure_settings)
    assert password and password not in (tmp_path / "worker.log").read_text()


@pytest.mark.parametrize(
    "client",
    ["plaintext without credentials", "TLS without SASL", "a wrong password"],
)
def test_clients_without_the_right_credentials_are_refused(
    secure_settings: Settings, client: str
) -> None:
    base = secure_settings.model_copy(update={"request_timeout_s": REFUSAL_TIMEOUT_S})
    update: dict[str, Any] = {
        "plaintext without credentials": {"kafka_dev_security": False},
        "TLS without SASL": {"kafka_security_protocol": "SSL"},
        "a wrong password": {"kafka_sasl_password": SecretStr("not-the-password")},
    }[client]
    settings = base.model_copy(update=update)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="failed to connect") as refused:
        asyncio.run(produce(settings, "refused", [(None, b"x")]))
    assert time.monotonic() - started < REFUSAL_TIMEOUT_S + 5  # refused, not hung
    assert refused.value.retriable and "SASL/TLS settings" in str(refused.value)
