"""Text features over a batch of records: embeddings, words, zero-shot scores, entities,
clusters (the spec's text feature kinds, :data:`streamml.schemas.spec.TEXT_FEATURES`).

The engine calls :meth:`TextFeaturizer.transform_many` once per partition batch, after the
per-record features and before scoring, so the text model runs on micro-batches. Each
distinct text of a batch is embedded once, and the :class:`~streamml.models.embeddings.Embedder`
keeps embeddings by text hash, so an event's text is embedded once whatever uses it
(embedding, zero-shot and cluster features, summaries).

State lives in the partition's :class:`~streamml.models.features.GlobalState` (JSON, in
the changelog like the other running statistics): tf-idf document frequencies per hash
bucket and the clusters' centroids (on a 64-d projection), both bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from streamml.models import nlp
from streamml.models.embeddings import MODEL_ID, Embedder, load_encoder
from streamml.models.features import GlobalState, Vector
from streamml.schemas.records import Record
from streamml.schemas.spec import (
    ClusterFeature,
    EmbeddingFeature,
    EntitiesFeature,
    PipelineSpec,
    WordsFeature,
    ZeroShotFeature,
)

log = logging.getLogger("streamml.text")

CLUSTER_DIMS = 64  # clusters live on a fixed projection: small state, cosine kept
CLUSTER_SEED = 1729


@dataclass
class NewCluster:
    """A cluster that formed after its feature's warm-up: a data-drift signal."""

    index: int  # the record of the batch that opened it
    feature: str
    cluster: int
    clusters: int  # how many exist now


@dataclass
class TextResult:
    vectors: list[Vector]  # one per record, already selected like the other features
    weak: list[tuple[str, float] | None]  # the weak label (class, confidence) per record
    new_clusters: list[NewCluster] = field(default_factory=list)


def labeller_source(spec: PipelineSpec) -> str | None:
    """``zero_shot:<feature>``: the source name of the spec's weak labels, if any."""
    weak = spec.annotate.weak_labels
    return None if weak is None else f"zero_shot:{weak.feature}"


def labeller_version(spec: PipelineSpec) -> str:
    """The weak labeller as a versioned model: the encoder and the label descriptions."""
    import hashlib
    import json

    weak = spec.annotate.weak_labels
    labels = {}
    for f in spec.text_features:
        if isinstance(f, ZeroShotFeature) and weak is not None and f.name == weak.feature:
            labels = {"labels": f.labels, "t": f.temperature}
    digest = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:8]
    return f"{MODEL_ID}-zs-{digest}"


class TextFeaturizer:
    """The spec's text features for batches of records."""

    def __init__(
        self,
        spec: PipelineSpec,
        cache_dir: Path,
        select: Callable[[Vector], Vector] | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.spec = spec
        self.features = spec.text_features
        self.cache_dir = cache_dir
        self._select = select
        self._embedder = embedder
        self._labels: dict[str, tuple[list[str], npt.NDArray[np.float32]]] = {}
        self._projections: dict[str, npt.NDArray[np.float32]] = {}
        weak = spec.annotate.weak_labels
        self.weak_feature = weak.feature if weak is not None else None
        embedded = (EmbeddingFeature, ZeroShotFeature, ClusterFeature)
        self.embedded_fields = sorted({f.field for f in self.features if isinstance(f, embedded)})

    @property
    def active(self) -> bool:
        return bool(self.features)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            t = self.spec.text
            encoder = load_encoder(
                self.cache_dir, device=t.device, max_length=t.max_length, threads=t.threads
            )
            self._embedder = Embedder(encoder, size=t.cache_size)
        return self._embedder

    def warm(self) -> None:
        """Load every model the features need now (at worker start), so a missing package
        or a refused weight file fails at start and the first batch is not slow."""
        if self.embedded_fields:
            self.embedder.embed(["warm up"])
            for f in self.features:
                if isinstance(f, ZeroShotFeature):
                    self._label_matrix(f)
        if any(isinstance(f, EntitiesFeature) for f in self.features):
            nlp.entity_counts(["warm up"], ["ORG"])

    def _label_matrix(self, f: ZeroShotFeature) -> tuple[list[str], npt.NDArray[np.float32]]:
        found = self._labels.get(f.name)
        if found is None:
            classes = list(f.labels)
            found = (classes, self.embedder.embed([f.labels[c] for c in classes]))
            self._labels[f.name] = found
        return found

    def _projection(self, name: str, dims: int, seed: int) -> npt.NDArray[np.float32]:
        p = self._projections.get(name)
        if p is None:
            p = self._projections[name] = np.asarray(
                nlp.random_projection(self.embedder.dim, dims, seed), dtype=np.float32
            )
        return p

    def transform_many(self, records: Sequence[Record], state: GlobalState) -> TextResult:
        n = len(records)
        out: list[Vector] = [{} for _ in range(n)]
        weak: list[tuple[str, float] | None] = [None] * n
        result = TextResult(out, weak)
        if not n:
            return result
        texts = {
            name: [_text(r, name) for r in records] for name in {f.field for f in self.features}
        }
        embedded = {name: self.embedder.embed(texts[name]) for name in self.embedded_fields}
        for f in self.features:
            if isinstance(f, EmbeddingFeature):
                m = embedded[f.field]
                if f.dims is not None:
                    m = m @ self._projection(f"e:{f.name}", f.dims, f.seed)
                keys = [f"{f.name}_{j}" for j in range(m.shape[1])]
                for vec, row in zip(out, m.tolist(), strict=True):
                    vec.update(zip(keys, row, strict=True))
            elif isinstance(f, ZeroShotFeature):
                classes, matrix = self._label_matrix(f)
                probs = nlp.softmax_similarities(embedded[f.field], matrix, f.temperature)
                keys = [f"{f.name}={c}" for c in classes]
                for i, row in enumerate(probs.tolist()):
                    out[i].update(zip(keys, row, strict=True))
                    top = int(np.argmax(row))
                    out[i][f"{f.name}#top={classes[top]}"] = 1.0
                    if f.name == self.weak_feature:
                        weak[i] = (classes[top], float(row[top]))
            elif isinstance(f, WordsFeature):
                self._words(f, texts[f.field], state, out)
            elif isinstance(f, EntitiesFeature):
                counts = nlp.entity_counts(texts[f.field], f.types)
                for vec, found in zip(out, counts, strict=True):
                    vec.update({f"{f.name}={t}": float(c) for t, c in found.items()})
            elif isinstance(f, ClusterFeature):
                self._clusters(f, embedded[f.field], state, result)
        if self._select is not None:
            result.vectors = [self._select(v) for v in out]
        return result

    def _words(
        self, f: WordsFeature, texts: list[str], state: GlobalState, out: list[Vector]
    ) -> None:
        df: dict[str, Any] = state.data.setdefault(f"{f.name}@df", {})
        for vec, text in zip(out, texts, strict=True):
            counts = nlp.hashed_tokens(text, f.buckets, f.ngram_range, f.lowercase)
            if f.kind == "tfidf":
                docs = int(state.data.get(f"{f.name}@n", 0)) + 1
                state.data[f"{f.name}@n"] = docs
                weights = nlp.tfidf(counts, df, docs)
            else:
                weights = {b: float(c) for b, c in counts.items()}
            vec.update({f"{f.name}#{b}": w for b, w in weights.items()})

    def _clusters(
        self, f: ClusterFeature, m: npt.NDArray[np.float32], state: GlobalState, res: TextResult
    ) -> None:
        key = f"{f.name}@clusters"
        clusters = nlp.OnlineClusters(
            state.data.get(key),
            threshold=f.threshold,
            max_clusters=f.max_clusters,
            min_events=f.min_events,
        )
        reduced = m @ self._projection("cluster", CLUSTER_DIMS, CLUSTER_SEED)
        for i, row in enumerate(reduced):
            cid, is_new = clusters.assign(row)
            res.vectors[i][f"{f.name}#{cid}"] = 1.0
            if is_new and clusters.drift(cid):
                res.new_clusters.append(NewCluster(i, f.name, cid, clusters.size))
        state.data[key] = clusters.state


def _text(record: Record, name: str) -> str:
    value = record.fields.get(name)
    return value if isinstance(value, str) else ""
