"""The sink's batching core, with a stand-in warehouse that fails on demand."""

from __future__ import annotations

import asyncio
from typing import Any

from streamml.config import load_settings
from streamml.errors import WarehouseError
from streamml.streams.sink import PREDICTION_COLUMNS, WarehouseSink, dlq_row, prediction_row


class FlakyWarehouse:
    """Refuses the first ``failures`` inserts into ``predictions``, then accepts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.rows: dict[str, list[tuple[Any, ...]]] = {}

    def insert(self, table: str, rows: list[tuple[Any, ...]], columns: list[str]) -> int:
        assert all(len(r) == len(columns) for r in rows)
        if table == "predictions" and self.failures:
            self.failures -= 1
            raise WarehouseError("server went away")
        self.rows.setdefault(table, []).extend(rows)
        return len(rows)


PREDICTION = {
    "pipeline": "p",
    "event_id": "e1",
    "entity_key": "u1",
    "ts_ms": 1_767_225_600_000,
    "model_name": "m",
    "model_version": "v",
    "role": "champion",
    "served": True,
    "score": 0.7,
    "predicted_class": "True",
    "probabilities": {"True": 0.7, "False": 0.3},
    "latency_ms": 0.1,
    "ingest_ms": 1_767_225_600_000,
    "emitted_ms": 1_767_225_600_040,
}
DEAD = {
    "pipeline": "p",
    "topic": "p.raw",
    "partition": 2,
    "offset": 9,
    "ts_ms": 1_767_225_600_000,
    "error_class": "malformed_json",
    "reason": "bad",
    "payload": "{",
    "key": "k",
}


def test_a_failed_write_is_retried_and_nothing_is_written_twice() -> None:
    warehouse = FlakyWarehouse(failures=2)
    sink = WarehouseSink(load_settings(), [], warehouse)  # type: ignore[arg-type]
    buffers = {"dead_letters": [dlq_row(DEAD)], "predictions": [prediction_row(PREDICTION)]}
    asyncio.run(sink._flush_until_written(buffers))
    assert sink.stats.failed_flushes == 2
    assert len(warehouse.rows["predictions"]) == 1
    assert len(warehouse.rows["dead_letters"]) == 1  # written once, not once per retry
    assert buffers == {}


def test_prediction_row_carries_end_to_end_latency() -> None:
    row = dict(zip(PREDICTION_COLUMNS, prediction_row(PREDICTION), strict=True))
    assert row["e2e_latency_ms"] == 40.0  # emitted - ingested, ms
    assert row["probabilities"] == {"True": 0.7, "False": 0.3}
    assert row["served"] == 1
