"""The support-ticket generator and the tickets pipeline's text choices.

The generator must be a fair test of a text classifier: deterministic, every category
present, a new product only after the drift, bad records that the tickets spec rejects.
The zero-shot descriptions in pipelines/tickets.yaml and an online model on the body
embeddings are checked with the real MiniLM encoder, as the pipeline runs them.
"""

from __future__ import annotations

import collections
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamml.models import tickets as gen
from streamml.models.synthetic import Example
from streamml.schemas.records import DeadLetter, Record, Source, label_problem, validate
from streamml.schemas.spec import EmbeddingFeature, ZeroShotFeature, load_spec

ROOT = Path(__file__).resolve().parents[3]
SPEC = load_spec(ROOT / "pipelines" / "tickets.yaml")
SRC = Source("tickets.raw", 0, 0, 0)


def _mentions_new_product(example: Example) -> bool:
    return gen.NEW_PRODUCT.lower() in orjson.dumps(example.record).decode().lower()


def test_the_same_seed_gives_the_same_tickets_and_another_seed_others() -> None:
    a, b = list(gen.tickets(300, seed=5)), list(gen.tickets(300, seed=5))
    assert a == b
    other = list(gen.tickets(300, seed=6))
    bodies = [e.record["body"] for e in a if isinstance(e.record, dict)]
    assert sum(x != y for x, y in zip(a, other, strict=True)) > 250
    assert len(set(bodies)) > 250  # templates and fillers vary the text, not a few strings


def test_every_category_is_present_and_none_dominates() -> None:
    labels = [e.label for e in gen.tickets(3000, drift_at=1.0, unlabelled=0.0)]
    shares = {c: n / len(labels) for c, n in collections.Counter(labels).items()}
    assert set(shares) == set(gen.CATEGORIES) == set(SPEC.label.classes or [])
    assert all(0.08 <= s <= 0.3 for s in shares.values()), shares


def test_the_unlabelled_share_is_as_asked_and_leaves_the_records_alone() -> None:
    for share in (0.0, 0.3, 0.8):
        examples = list(gen.tickets(4000, unlabelled=share))
        missing = sum(e.label is None for e in examples) / len(examples)
        assert abs(missing - share) < 0.03, (share, missing)
    full = [e.record for e in gen.tickets(500, unlabelled=0.0)]
    assert full == [e.record for e in gen.tickets(500, unlabelled=0.8)]


def test_the_new_product_appears_only_after_the_drift_and_then_often() -> None:
    examples = list(gen.tickets(4000, drift_at=0.6, unlabelled=0.0))
    before, after = examples[:2400], examples[2400:]
    assert not any(_mentions_new_product(e) for e in before)
    new = [e for e in after if _mentions_new_product(e)]
    assert len(new) / len(after) > 0.3
    # ... bringing a new kind of technical complaint
    labels = collections.Counter(e.label for e in new)
    assert labels["technical"] / len(new) > 0.55
    assert all(gen.NEW_PRODUCT not in str(e.record) for e in gen.tickets(1000, drift_at=1.0))


def test_bad_records_are_bytes_the_spec_rejects_for_different_reasons() -> None:
    examples = list(gen.tickets(400, bad_every=20))
    bad = [e for e in examples if isinstance(e.record, bytes)]
    assert len(bad) == 20
    assert all(e.label is None for e in bad)
    reasons = set()
    for e in bad:
        assert isinstance(e.record, bytes)
        result = validate(SPEC, e.record, SRC)
        assert isinstance(result, DeadLetter), e.record[:80]
        reasons.add(result.error_class)
    assert len(reasons) >= 7, reasons
    for raw in gen.BAD_RECORDS:  # every one of them, not only those drawn
        assert isinstance(validate(SPEC, raw, SRC), DeadLetter), raw[:80]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**63 - 1),
    drift_at=st.floats(min_value=0.0, max_value=1.0),
    span_s=st.one_of(st.none(), st.floats(min_value=1.0, max_value=10 * 365 * 86400.0)),
)
def test_every_good_ticket_validates_with_a_valid_label(
    seed: int, drift_at: float, span_s: float | None
) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for e in gen.tickets(200, seed=seed, drift_at=drift_at, span_s=span_s, start=start):
        record = validate(SPEC, orjson.dumps(e.record), SRC)
        assert isinstance(record, Record), record
        assert e.key == record.entity_key
        assert e.label is None or label_problem(SPEC, e.label) is None


# --- with the real encoder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> tuple[list[Any], np.ndarray[Any, Any], Any]:
    """1,000 tickets (drift halfway), their labels, body embeddings and the embedder."""
    from streamml.config import Settings
    from streamml.models.embeddings import Embedder, load_encoder

    # the model packages are installed by bootstrap.sh: missing, this fails (never skips)
    embedder = Embedder(load_encoder(Settings().cache_dir, device="cpu"))
    examples = list(gen.tickets(1000, seed=11, unlabelled=0.0))
    bodies = [str(e.record["body"]) for e in examples if isinstance(e.record, dict)]
    matrix = np.concatenate([embedder.embed(bodies[i : i + 128]) for i in range(0, 1000, 128)])
    return [e.label for e in examples], matrix, embedder


def _feature(kind: type[Any]) -> Any:
    return next(f for f in SPEC.features if isinstance(f, kind))


def test_the_zero_shot_descriptions_label_most_tickets_right(
    embedded: tuple[list[Any], np.ndarray[Any, Any], Any],
) -> None:
    labels, matrix, embedder = embedded
    topic = _feature(ZeroShotFeature)
    classes = list(topic.labels)
    descriptions = embedder.embed([topic.labels[c] for c in classes])  # one batch, as served
    weak = np.asarray(classes)[np.argmax(matrix @ descriptions.T, axis=1)]
    right = weak == np.asarray(labels)
    # measured: 0.83 before the drift, 0.89 after (2,000 tickets of seed 11: 0.85, 0.88)
    assert right[:500].mean() >= 0.8, right[:500].mean()
    assert right[500:].mean() >= 0.8, right[500:].mean()


def test_softmax_regression_learns_the_categories_from_the_body_embedding(
    embedded: tuple[list[Any], np.ndarray[Any, Any], Any],
) -> None:
    from river import compose, linear_model, optim, preprocessing

    labels, matrix, _ = embedded
    body = _feature(EmbeddingFeature)
    dims = body.dims or matrix.shape[1]
    projection = np.random.default_rng(body.seed).standard_normal((matrix.shape[1], dims))
    reduced = matrix @ projection / np.sqrt(dims)
    model = compose.Pipeline(
        preprocessing.StandardScaler(), linear_model.SoftmaxRegression(optimizer=optim.SGD(0.01))
    )
    hits = []
    for row, y in zip(reduced, labels, strict=True):
        x = {f"{body.name}_{j}": float(v) for j, v in enumerate(row)}
        hits.append(model.predict_one(x) == y)
        model.learn_one(x, y)
    second = labels[500:]
    majority = collections.Counter(second).most_common(1)[0][1] / len(second)
    accuracy = float(np.mean(hits[500:]))
    assert accuracy > majority + 0.3, (accuracy, majority)  # measured: 0.88 against 0.41
