"""Integration fixtures: a real Kafka broker (the dev stack) and real chDB, never mocks.

The broker is started once per session through ``LocalBroker`` in a temporary state
dir on free ports, unless STREAMML_TEST_KAFKA_BOOTSTRAP names a running cluster.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamml.config import Settings
from streamml.devstack import LocalBroker
from streamml.streams.warehouse import Warehouse
from streamml.testing import isolated_settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of the session's broker and chDB path."""
    state = tmp_path_factory.mktemp("stack")
    external = os.environ.get("STREAMML_TEST_KAFKA_BOOTSTRAP")
    overrides = {"request_timeout_s": 10.0}
    if external:
        yield isolated_settings(state, kafka_bootstrap=external, **overrides)
        return
    settings = isolated_settings(state, **overrides)
    broker = LocalBroker(settings)
    broker.up()
    try:
        yield settings
    finally:
        broker.down()


@pytest.fixture(scope="session")
def session_warehouse(stack_settings: Settings) -> Iterator[Warehouse]:
    """The one chDB path this test process may open, migrated."""
    warehouse = Warehouse.connect(stack_settings)
    yield warehouse
    warehouse.close()
