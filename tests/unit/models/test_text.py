"""The text featurizer on its own: every text kind, selection, bounded JSON state, and one
encoder call per distinct text (the real models)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from streamml.config import Settings
from streamml.models.embeddings import Embedder, load_encoder
from streamml.models.features import Featurizer, GlobalState
from streamml.models.text import TextFeaturizer
from streamml.schemas.records import Record
from streamml.schemas.spec import PipelineSpec, parse_spec

TEXTS = [
    "Apple hired Tim Cook in Cupertino in 1998 for $2 million.",
    "My invoice from Acme Corp shows a double charge of $40.",
    "The app crashes on my phone.",
    "The app crashes on my phone.",
]


def _spec(**extra: Any) -> PipelineSpec:
    return parse_spec(
        {
            "name": "t",
            "task": "classification",
            "schema": {"fields": {"body": {"type": "string"}, "x": {"type": "float"}}},
            "label": {"field": "y", "classes": ["a", "b"]},
            "features": [
                {"name": "x", "kind": "numeric", "field": "x"},
                {"name": "vec", "kind": "embedding", "field": "body", "dims": 4},
                {"name": "words", "kind": "bag_of_words", "field": "body", "buckets": 8},
                {"name": "tf", "kind": "tfidf", "field": "body", "buckets": 8},
                {"name": "ents", "kind": "entities", "field": "body", "types": ["ORG", "MONEY"]},
                {"name": "topic", "kind": "cluster", "field": "body", "min_events": 0},
                {
                    "name": "zs",
                    "kind": "zero_shot",
                    "field": "body",
                    "labels": {"a": "money and invoices", "b": "software bugs"},
                },
            ],
            "online_model": {"kind": "logistic_regression"},
            **extra,
        }
    )


class Counting:
    """The real encoder, counting the texts it is asked to embed."""

    def __init__(self) -> None:
        self.inner = load_encoder(Settings().cache_dir)
        self.dim, self.device, self.texts = self.inner.dim, self.inner.device, 0

    def encode(self, texts: Any) -> Any:
        self.texts += len(texts)
        return self.inner.encode(texts)


def _records() -> list[Record]:
    return [Record(f"e{i}", 1_000 + i, "", {"body": t, "x": 1.0}) for i, t in enumerate(TEXTS)]


def test_every_text_kind_and_one_encoder_call_per_distinct_text() -> None:
    spec = _spec()
    encoder = Counting()
    text = TextFeaturizer(spec, Settings().cache_dir, embedder=Embedder(encoder))
    state = GlobalState()
    result = text.transform_many(_records(), state)
    first = result.vectors[0]
    assert {f"vec_{i}" for i in range(4)} <= set(first)
    assert first["ents=ORG"] >= 1 and first["ents=MONEY"] == 1
    assert any(k.startswith("words#") for k in first) and any(k.startswith("tf#") for k in first)
    assert sum(k.startswith("topic#") for k in first) == 1
    assert result.vectors[2].keys() == result.vectors[3].keys()
    # 3 distinct texts + the 2 label descriptions, each embedded once
    assert encoder.texts == 3 + 2
    again = text.transform_many(_records(), state)
    assert encoder.texts == 5  # all cached now
    assert again.vectors[0]["vec_0"] == pytest.approx(first["vec_0"])
    # the state is JSON and bounded by the buckets and clusters
    restored = GlobalState(json.loads(json.dumps(state.data)))
    assert len(state.data["tf@df"]) <= 8 and len(state.data["topic@clusters"]["counts"]) <= 32
    third = text.transform_many(_records()[:1], restored)
    assert third.vectors[0]["tf#" + next(k[3:] for k in first if k.startswith("tf#"))] > 0


def test_selection_applies_to_text_keys_and_the_record_featurizer_skips_them() -> None:
    spec = _spec(exclude=["vec", "ents"])
    featurizer = Featurizer(spec)
    text = TextFeaturizer(spec, Settings().cache_dir, select=featurizer.select)
    [vector, *_] = text.transform_many(_records(), GlobalState()).vectors
    assert not any(k.startswith(("vec_", "ents=")) for k in vector)
    assert any(k.startswith("zs=") for k in vector)
    plain = featurizer.transform(_records()[0], GlobalState(), {})
    assert plain == {"x": 1.0}


def test_zero_shot_scores_are_a_distribution_and_the_weak_label_its_argmax() -> None:
    spec = _spec(annotate={"weak_labels": {"feature": "zs"}})
    text = TextFeaturizer(spec, Settings().cache_dir)
    result = text.transform_many(_records(), GlobalState())
    for vector, weak in zip(result.vectors, result.weak, strict=True):
        scores = {k[3:]: v for k, v in vector.items() if k.startswith("zs=")}
        assert sum(scores.values()) == pytest.approx(1.0)
        top = max(scores, key=lambda c: scores[c])
        assert weak == (top, pytest.approx(scores[top])) and vector[f"zs#top={top}"] == 1.0
    assert [w[0] for w in result.weak if w] == ["a", "a", "b", "b"]
    assert np.isfinite([v for vec in result.vectors for v in vec.values()]).all()


def test_the_gpu_encoder_code_agrees_with_the_int8_encoder_when_run_on_the_cpu() -> None:
    """TorchEncoder (CUDA fp16 where there is a GPU) run in fp32 on the CPU: tokenizing
    chunks ahead in threads keeps every row in its text's place, and its embeddings match
    the int8 ONNX encoder's (the GPU itself is checked only where one is lent)."""
    from streamml.models.embeddings import TorchEncoder

    texts = [r.fields["body"] for r in _records()] + ["short", "a little longer text"]
    gpu_code = TorchEncoder(chunk=2, device="cpu")
    got = gpu_code.encode(texts)
    want = load_encoder(Settings().cache_dir, device="cpu").encode(texts)
    assert got.shape == want.shape == (len(texts), 384)
    cosine = (got * want).sum(axis=1)  # both are unit length
    assert cosine.min() >= 0.98, cosine
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert gpu_code.encode([]).shape == (0, 384)
