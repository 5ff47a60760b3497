"""Text cores on the real models: MiniLM clusters and summaries, projections, zero-shot
scores, hashed words against river's TF-IDF, spaCy entities, refused weight files."""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from river.feature_extraction import TFIDF

from streamml.config import Settings
from streamml.models import nlp, weights
from streamml.models.embeddings import Embedder, load_encoder
from streamml.models.nlp import (
    OnlineClusters,
    entity_counts,
    extractive_summary,
    hashed_tokens,
    random_projection,
    softmax_similarities,
    tfidf,
)

WEATHER = [
    "Heavy rain is expected across the north tonight.",
    "Temperatures will drop below freezing by Friday.",
    "A storm warning was issued for the coast.",
    "Sunny skies and a light breeze this afternoon.",
    "Snow is forecast for the mountains this weekend.",
    "Strong winds knocked down trees overnight.",
]
FINANCE = [
    "The central bank raised interest rates by half a point.",
    "Shares fell sharply after the quarterly earnings report.",
    "Inflation slowed to three percent last month.",
    "The company issued bonds to refinance its debt.",
    "Investors sold tech stocks as yields climbed.",
    "The dollar weakened against the euro today.",
]
SPORTS = [
    "The striker scored twice in the second half.",
    "The team won the championship after extra time.",
    "The coach was sacked after five straight defeats.",
    "She broke the world record in the 100 metres.",
    "The tennis final went to five sets.",
    "The goalkeeper saved a penalty in the last minute.",
]
COOKING = [
    "Whisk the eggs with sugar until pale and fluffy.",
    "Simmer the tomato sauce for twenty minutes.",
    "Season the chicken with garlic and thyme before roasting.",
]
GROUPS = [WEATHER, FINANCE, SPORTS]
# Within a topic these sentences are only 0.27 cosine apart on average (0.08 at worst),
# across topics 0.03 (0.20 at most): a threshold of 0.2 separates them.
THRESHOLD = 0.2


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder(load_encoder(Settings().cache_dir))


@pytest.fixture(scope="module")
def interleaved(embedder: Embedder) -> tuple[list[int], np.ndarray]:
    """The three topics' sentences taken in turn, with their topic."""
    order = [(g, i) for i in range(6) for g in range(3)]
    vectors = embedder.embed([GROUPS[g][i] for g, i in order])
    return [g for g, _ in order], vectors


def test_clusters_separate_topics_and_flag_a_new_one(
    embedder: Embedder, interleaved: tuple[list[int], np.ndarray]
) -> None:
    topics, vectors = interleaved
    clusters = OnlineClusters({}, threshold=THRESHOLD, max_clusters=8, min_events=len(topics))
    found = [clusters.assign(v) for v in vectors]
    assert not any(clusters.drift(a.cluster) for a in found)  # opened during the warm-up
    members: dict[int, set[int]] = {}
    for topic, a in zip(topics, found, strict=True):
        members.setdefault(a.cluster, set()).add(topic)
    assert 3 <= len(clusters) <= 5, members
    assert all(len(t) == 1 for t in members.values()), f"a cluster mixes topics: {members}"

    later = [clusters.assign(v) for v in embedder.embed(COOKING)]
    assert later[0].is_new and clusters.drift(later[0].cluster)
    assert all(a.cluster == later[0].cluster and not a.is_new for a in later[1:])
    born = clusters.state["born"]
    assert born[later[0].cluster] > len(topics) >= max(born[:-1])
    assert clusters.assign(embedder.embed([WEATHER[0]])[0]).cluster == found[0].cluster


def test_cluster_state_round_trips_through_json(
    interleaved: tuple[list[int], np.ndarray],
) -> None:
    _, vectors = interleaved
    live = OnlineClusters({}, threshold=THRESHOLD, max_clusters=8, min_events=4)
    for v in vectors[:9]:
        live.assign(v)
    restored = OnlineClusters(
        json.loads(json.dumps(live.state)), threshold=THRESHOLD, max_clusters=8, min_events=4
    )
    assert [live.assign(v) for v in vectors[9:]] == [restored.assign(v) for v in vectors[9:]]
    assert json.dumps(live.state) == json.dumps(restored.state)


def test_clusters_stay_bounded(interleaved: tuple[list[int], np.ndarray]) -> None:
    _, vectors = interleaved
    clusters = OnlineClusters({}, threshold=0.99, max_clusters=2, min_events=0)
    found = [clusters.assign(v) for v in vectors]
    assert len(clusters) == 2 and len(clusters.state["centroids"]) == 2
    assert sum(clusters.state["counts"]) == len(vectors)
    assert [a.is_new for a in found].count(True) == 2
    with pytest.raises(ValueError, match="dimensions"):
        clusters.assign([1.0, 0.0])
    with pytest.raises(ValueError, match="non-zero"):
        clusters.assign(np.zeros(384))


def test_projection_keeps_cosines_roughly(interleaved: tuple[list[int], np.ndarray]) -> None:
    topics, vectors = interleaved
    p = random_projection(384, 128, seed=3)
    assert np.array_equal(p, random_projection(384, 128, seed=3))
    assert not np.array_equal(p, random_projection(384, 128, seed=4))
    low = vectors @ p
    low /= np.linalg.norm(low, axis=1, keepdims=True)
    before, after = vectors @ vectors.T, low @ low.T
    assert float(np.abs(after - before).mean()) < 0.1
    t = np.asarray(topics)
    same = (t[:, None] == t[None]) & ~np.eye(len(t), dtype=bool)
    assert after[same].mean() > after[t[:, None] != t[None]].mean() + 0.1


def test_zero_shot_picks_the_described_label(embedder: Embedder) -> None:
    labels = embedder.embed(["weather and forecasts", "money and markets", "sport and games"])
    scores = softmax_similarities(embedder.embed([WEATHER[2], FINANCE[1], SPORTS[4]]), labels)
    assert scores.shape == (3, 3)
    assert np.allclose(scores.sum(axis=1), 1.0)
    assert scores.argmax(axis=1).tolist() == [0, 1, 2]
    sharper = softmax_similarities(embedder.embed([WEATHER[2]])[0], labels, temperature=0.01)
    assert sharper.max() > scores[0].max()


def test_extractive_summary_picks_the_central_sentence(embedder: Embedder) -> None:
    text = " ".join([FINANCE[0], FINANCE[2], SPORTS[0], FINANCE[4]])
    one = extractive_summary(text, embedder)
    assert one in {FINANCE[0], FINANCE[2], FINANCE[4]}
    two = extractive_summary(text, embedder, max_sentences=2)
    assert SPORTS[0] not in two
    first, second = (text.index(s) for s in nlp.sentences(two))
    assert first < second  # in text order
    assert extractive_summary("  no punctuation here at all  ", embedder) == (
        "no punctuation here at all"
    )
    long = "word " * 200
    clipped = extractive_summary(long, embedder, max_chars=50)
    assert len(clipped) <= 51 and clipped.endswith("…")


def test_hashed_tokens_count_words_and_ngrams() -> None:
    counts = hashed_tokens("Rain, rain; go away", buckets=64)
    assert sum(counts.values()) == 4 and all(0 <= b < 64 for b in counts)
    assert counts[zlib.crc32(b"rain") % 64] >= 2
    cased = hashed_tokens("Rain rain", buckets=1 << 16, lowercase=False)
    assert sorted(cased.values()) == [1, 1]
    pairs = hashed_tokens("rain go away", buckets=1 << 16, ngram_range=(2, 2))
    assert set(pairs) == {zlib.crc32(b"rain go") % (1 << 16), zlib.crc32(b"go away") % (1 << 16)}


def test_tfidf_matches_river_and_stays_bounded() -> None:
    corpus = [
        "This is the first document.",
        "This document is the second document.",
        "And this is the third one.",
        "Is this the first document?",
    ]
    river, df, buckets = TFIDF(), {}, 1 << 20  # wide enough for no collisions here
    for n, doc in enumerate(corpus, start=1):
        river.learn_one(doc)
        expected = {
            zlib.crc32(t.encode()) % buckets: w for t, w in river.transform_one(doc).items()
        }
        got = tfidf(hashed_tokens(doc, buckets), df, n)
        assert got.keys() == expected.keys()
        assert all(abs(got[b] - expected[b]) < 1e-12 for b in got)
    assert len(df) == 9  # the distinct words
    small: dict[str, int] = {}
    for n, doc in enumerate(corpus * 10, start=1):
        tfidf(hashed_tokens(doc, 4), small, n)
    assert len(small) <= 4 and max(small.values()) <= 40
    assert json.loads(json.dumps(small)) == small
    assert tfidf({}, small, 41) == {}


def test_spacy_finds_people_and_organisations() -> None:
    texts = [
        "Tim Cook said Apple will open an office in Berlin.",
        "Microsoft hired Jane Smith as its new chief scientist.",
        "",
        "the weather is nice",
    ]
    found = entity_counts(texts, ["PERSON", "ORG", "GPE"])
    assert len(found) == 4
    assert found[0]["PERSON"] >= 1 and found[0]["ORG"] >= 1 and found[0]["GPE"] >= 1
    assert found[1]["PERSON"] >= 1 and found[1]["ORG"] >= 1
    assert found[2] == {"PERSON": 0.0, "ORG": 0.0, "GPE": 0.0}
    assert set(found[3]) == {"PERSON", "ORG", "GPE"}
    assert nlp.load_ner().pipe_names == ["ner"]


def _fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """Point the ``name`` weights at a file of the wrong content in a temporary package."""
    w = weights.WEIGHTS[name]
    target = tmp_path / w.path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"not the recorded weights")
    monkeypatch.setattr(weights, "package_dir", lambda package: tmp_path)
    return target


def test_a_swapped_weight_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_package(tmp_path, monkeypatch, "spacy-ner")
    with pytest.raises(weights.WeightsIntegrityError, match="refusing to load"):
        weights.verified("spacy-ner")
    monkeypatch.setattr(nlp, "_nlp", None)  # as in a fresh process
    with pytest.raises(weights.WeightsIntegrityError):
        entity_counts(["Apple"], ["ORG"])
    assert nlp._nlp is None
    recorded = weights.sha256_of(tmp_path / weights.WEIGHTS["spacy-ner"].path)
    right = dataclasses.replace(weights.WEIGHTS["spacy-ner"], sha256=recorded)
    monkeypatch.setitem(weights.WEIGHTS, "spacy-ner", right)
    assert weights.verified("spacy-ner") == tmp_path / right.path
