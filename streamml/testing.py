"""Helpers for tests of streamml and of users' pipelines (no pytest dependency)."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streamml.config import Settings, load_settings
from streamml.models.registry import ModelVersion, Registry
from streamml.streams.warehouse import Warehouse

# the model signing key of test registries (a test of refusal signs with another one)
TEST_SIGNING_KEY = b"streamml-test-model-signing-key"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def isolated_settings(state_dir: Path, **overrides: Any) -> Settings:
    """Settings with their own state dir and free broker/web ports (cache dir is shared)."""
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "kafka_port": free_port(),
        "kafka_controller_port": free_port(),
        "web_port": free_port(),
    }
    values.update(overrides)
    return load_settings(**values)


@contextmanager
def temporary_warehouse(settings: Settings, database: str) -> Iterator[Warehouse]:
    """A migrated warehouse in its own database, dropped afterwards.

    chDB lets one process open one path, so tests in one process share the
    settings' chDB path and separate themselves by database.
    """
    scoped = settings.model_copy(update={"clickhouse_database": database})
    warehouse = Warehouse.connect(scoped)
    try:
        yield warehouse
    finally:
        warehouse.command(f"DROP DATABASE IF EXISTS {database}")
        warehouse.close()


@contextmanager
def temporary_registry(signing_key: bytes = TEST_SIGNING_KEY) -> Iterator[Registry]:
    """An empty model registry in a temporary directory, signing with ``signing_key``;
    removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="streamml-registry-") as root:
        yield Registry(Path(root), signing_key=signing_key)


def register_dummy(
    registry: Registry, pipeline: str = "demo", payload: bytes = b"model", **overrides: Any
) -> ModelVersion:
    """Register a small fake model (features x1, x2; binary classes); keywords override."""
    values: dict[str, Any] = {
        "kind": "batch",
        "spec_hash": "0" * 16,
        "feature_names": ["x1", "x2"],
        "classes": ["0", "1"],
        "task": "classification",
        "training_window": {"start": 0, "end": 60_000, "rows": 100},
        "metrics": {"accuracy": 0.9},
        "params": {},
        "parent_version": None,
        "artifact_name": "model.onnx",
    }
    values.update(overrides)
    return registry.register(pipeline, payload, **values)
