"""Weak labels in batch training: they join the training part only, weighted by the
labeller's confidence, and help when true labels are few."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]

from streamml.models.training import frame_from_rows, predict, prepare, train
from tests.unit.models.test_training import make_rows, make_spec

CLASSES = ["low", "mid", "high"]


def _weak_frame(rows: list[Any], noise: float, confidence: float, seed: int) -> pd.DataFrame:
    """The rows' true labels, a share ``noise`` replaced at random, with a confidence."""
    rng = np.random.default_rng(seed)
    noisy = [
        (e, ts, f, CLASSES[int(rng.integers(3))] if rng.random() < noise else y)
        for e, ts, f, y in rows
    ]
    frame = frame_from_rows(noisy)
    frame["confidence"] = confidence
    return frame


def _accuracy(result: Any, spec: Any, frame: pd.DataFrame) -> float:
    data = prepare(spec, frame, feature_names=result.feature_names, classes=result.classes)
    predicted = predict(result.model, data.X).argmax(axis=1)
    return float((predicted == data.y).mean())


def test_weak_labels_help_when_true_labels_are_few_and_never_reach_validation() -> None:
    spec = make_spec(loss="cross_entropy", epochs=30, early_stopping_patience=30)
    rows = make_rows(4000, kind="multiclass", seed=3)
    # true labels on every 40th event only; the labeller (85% right) on the others
    true = [r for i, r in enumerate(rows) if i % 40 == 0]
    unlabelled = [r for i, r in enumerate(rows) if i % 40 != 0]
    frame = frame_from_rows(true)
    plain = train(spec, frame)
    weak = _weak_frame(unlabelled, noise=0.15, confidence=0.85, seed=1)
    helped = train(spec, frame, weak=weak)
    # the same true rows are split and evaluated the same way: only training grew
    assert helped.splits == plain.splits
    validation_start = int(prepare(spec, frame).ts_ms[plain.splits.validation.slice][0])
    before = int((weak["ts"] < validation_start).sum())
    assert helped.weak_rows == before < len(weak)
    held_out = frame_from_rows(make_rows(3000, kind="multiclass", seed=9))
    a_plain, a_helped = (_accuracy(r, spec, held_out) for r in (plain, helped))
    print(f"held-out accuracy: true labels only {a_plain:.3f}, with weak labels {a_helped:.3f}")
    assert a_helped > a_plain + 0.03


def test_weak_labels_with_zero_confidence_or_unknown_classes_change_nothing() -> None:
    spec = make_spec(loss="cross_entropy")
    rows = make_rows(600, kind="multiclass", seed=4)
    frame = frame_from_rows(rows[::2])
    plain = train(spec, frame)
    silent = _weak_frame(rows[1::2], noise=0.0, confidence=0.0, seed=2)
    same = train(spec, frame, weak=silent)
    x = prepare(spec, frame, feature_names=plain.feature_names).X
    assert np.allclose(predict(plain.model, x), predict(same.model, x), atol=1e-6)
    alien = _weak_frame(rows[1::2], noise=0.0, confidence=1.0, seed=2)
    alien["label"] = "unheard-of"
    assert train(spec, frame, weak=alien).weak_rows == 0
