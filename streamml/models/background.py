"""Sampled language-model work in a process of its own, at the lowest CPU priority.

Summaries, the generative model's weak labels and its judgements are samples: useful,
never urgent. Run in a thread of the worker they competed with scoring for the GIL and
the cores: on 2 cores at 110 events/s, summarising every event in a thread tripled the
scoring p50 (41 -> 136 ms) and capping the thread at a quarter of a core still left the
p99 2.5x higher (``bench/text.py``, session 5). So they run here instead:

* in one child process, spawned (not forked: the worker has threads), so it shares no
  interpreter lock and no model lock with the worker;
* at ``SCHED_IDLE`` on Linux (``nice 19`` where that is refused or missing): the kernel
  runs it only on a core that nothing else wants, and a scoring thread waking up
  preempts it. Threads the child starts (llama.cpp's) inherit the policy.

A sample that waits too long is dropped by the caller's bounded queue, never the event.

The calls are plain data (:class:`Call`) and :func:`run` is a plain function, so the same
work also runs in-process (tests, ``Annotator._work``).

>>> Call("summary", "Rain. More rain.", method="extractive").kind
'summary'
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamml.errors import BackgroundProcessDied

IDLE = "idle"  # SCHED_IDLE
NICE = "nice19"


@dataclass(frozen=True)
class Call:
    """One sampled job: ``summary`` (``method`` extractive or generative), ``label``
    (over ``classes``, name -> description) or ``judge`` (``served`` against ``weak``)."""

    kind: str
    text: str
    method: str = "extractive"
    classes: Mapping[str, str] = field(default_factory=dict)
    served: str = ""
    weak: str = ""
    cache_dir: str = ""  # where the text encoder's ONNX export is (extractive summaries)
    max_length: int = 128


def lower_priority() -> str:
    """Put the calling process at the lowest CPU priority it may take; says which."""
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return IDLE
        except OSError:
            pass
    with contextlib.suppress(OSError):
        os.nice(19 - os.nice(0))
    return NICE


def priority() -> tuple[int, str, int]:
    """This process's id, scheduling class (``idle``, ``nice19`` or ``normal``) and niceness."""
    niceness = os.nice(0)
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) == os.SCHED_IDLE:
        return os.getpid(), IDLE, niceness
    return os.getpid(), NICE if niceness >= 19 else "normal", niceness


_embedders: dict[tuple[str, int], Any] = {}


def _embedder(cache_dir: str, max_length: int) -> Any:
    from streamml.models.embeddings import Embedder, load_encoder

    key = (cache_dir, max_length)
    if key not in _embedders:  # the CPU encoder: background work needs no GPU
        encoder = load_encoder(Path(cache_dir), device="cpu", max_length=max_length, threads=1)
        _embedders[key] = Embedder(encoder, size=2_000)
    return _embedders[key]


def run(call: Call) -> Any:
    """The model call: a summary (str), a label (``(class, confidence)`` or None) or a
    verdict (``served``, ``weak`` or ``neither``)."""
    from streamml.models import generative, nlp

    if call.kind == "summary":
        if call.method == "generative":
            return generative.summarize(call.text)
        return nlp.extractive_summary(call.text, _embedder(call.cache_dir, call.max_length))
    if call.kind == "label":
        return generative.label(call.text, call.classes)
    if call.kind == "judge":
        return generative.judge(call.text, call.served, call.weak, call.classes)
    raise ValueError(f"unknown background job {call.kind!r}")


class LowPriorityProcess:
    """One spawned child at the lowest priority that runs :func:`run`; started on first use
    and again after it died (a job that killed it counts as failed, the next starts anew)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.restarts = 0

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=lower_priority,
                )
            return self._pool

    async def call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the child (``fn`` a module-level function)."""
        pool = self._executor()
        try:
            return await asyncio.wrap_future(pool.submit(fn, *args))
        except BrokenProcessPool as exc:  # the child died (killed, out of memory)
            with self._lock:
                if self._pool is pool:
                    self._pool = None
                    self.restarts += 1
            pool.shutdown(wait=False, cancel_futures=True)
            raise BackgroundProcessDied(
                "the background model process died",
                hint="it starts again with the next sample; check the worker's memory",
            ) from exc

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
