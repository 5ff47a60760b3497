"""Weak labels read back for training on real chDB: only events no true label came for,
only the spec's labeller, only classes a true label can be, with their confidence.

It opens the session's chDB in this process (see test_warehouse_judge.py on ordering)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from streamml import lifecycle
from streamml.config import Settings
from streamml.lifecycle import Window
from streamml.schemas.catalog import load_pipelines
from streamml.schemas.spec import PipelineSpec
from streamml.streams.rows import ANNOTATION_COLUMNS, FEATURE_COLUMNS, LABEL_COLUMNS
from streamml.streams.warehouse import Warehouse
from streamml.testing import temporary_warehouse

from .test_pipeline import ROOT

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def _weak(spec: PipelineSpec, **update: object) -> PipelineSpec:
    """The spec with its weak_labels section changed (specs are frozen)."""
    assert spec.annotate.weak_labels is not None
    weak = spec.annotate.weak_labels.model_copy(update=update)
    return spec.model_copy(
        update={"annotate": spec.annotate.model_copy(update={"weak_labels": weak})}
    )


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    [found] = load_pipelines(ROOT / "pipelines", ["tickets"])
    return _weak(found, min_confidence=0.0, train=True)


@pytest.fixture
def warehouse(stack_settings: Settings, session_warehouse: Warehouse) -> Iterator[Warehouse]:
    with temporary_warehouse(stack_settings, "t_weak") as wh:
        yield wh


def _ts(i: int) -> dt.datetime:
    return T0 + dt.timedelta(seconds=i)


def test_weak_rows_are_the_unlabelled_events_of_the_spec_labeller(
    warehouse: Warehouse, spec: PipelineSpec, stack_settings: Settings
) -> None:
    features = [("tickets", f"e{i}", "c", _ts(i), {"x": float(i)}) for i in range(10)]
    labels = [("tickets", f"e{i}", "c", _ts(i), "billing", 0.0) for i in range(5)]
    source = "zero_shot:topic"
    notes = [
        ("tickets", f"e{i}", _ts(i), source, "zs", "technical", 0.5 + i / 20) for i in range(10)
    ]
    notes.append(("tickets", "e6", _ts(6), "generative", "llm", "account", 0.99))  # not ours
    notes[7] = ("tickets", "e7", _ts(7), source, "zs", "no-such-class", 0.9)  # not a class
    warehouse.insert("features", features, FEATURE_COLUMNS)
    warehouse.insert("labels", labels, LABEL_COLUMNS)
    warehouse.insert("annotations", notes, ANNOTATION_COLUMNS)

    frame = lifecycle.read_weak_rows(stack_settings, spec, Window(), warehouse.query)
    assert frame is not None
    assert frame["event_id"].tolist() == ["e5", "e6", "e8", "e9"]
    assert frame["label"].tolist() == ["technical"] * 4
    assert frame["confidence"].round(3).tolist() == [0.75, 0.8, 0.9, 0.95]
    assert frame["x"].tolist() == [5.0, 6.0, 8.0, 9.0]

    since = int(_ts(8).timestamp() * 1000)
    later = lifecycle.read_weak_rows(stack_settings, spec, Window(since_ms=since), warehouse.query)
    assert later is not None and later["event_id"].tolist() == ["e8", "e9"]

    picky = _weak(spec, min_confidence=0.85)
    high = lifecycle.read_weak_rows(stack_settings, picky, Window(), warehouse.query)
    assert high is not None and high["event_id"].tolist() == ["e8", "e9"]
    off = _weak(spec, train=False)
    assert lifecycle.read_weak_rows(stack_settings, off, Window(), warehouse.query) is None
