"""Sentence embeddings from all-MiniLM-L6-v2: int8 onnxruntime on the CPU, fp16 torch on CUDA.

The packaged weights (``streamml.models.weights``) are exported once to ONNX with mean
pooling and L2 normalisation inside the graph, then quantized to int8 per channel
(cosine >= 0.98 against torch here; the default per-tensor quantization measured 0.94);
the file is cached under ``<cache_dir>/models`` with its own sha256 beside it, checked
at every load. ``device: auto`` uses CUDA in fp16 where torch sees a GPU and the int8
CPU model elsewhere; the tokenizer (the Rust ``tokenizers`` one) runs in its own
threads, and on CUDA the next chunk is tokenized while the model runs on this one.

:class:`Embedder` adds what the stream needs: an LRU cache by text hash, so a text is
embedded once however many features or stages use it, and de-duplication within a
batch. One intra-op thread by default (measured faster on two busy cores).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from streamml.errors import ModelError
from streamml.models.weights import sha256_of, verified

log = logging.getLogger("streamml.embeddings")

DIM = 384
MODEL_ID = "minilm-l6-v2-int8"  # the version stamped on what the embeddings feed
Device = Literal["auto", "cpu", "cuda"]
Matrix = npt.NDArray[np.float32]


class Encoder(Protocol):
    """Texts -> unit-length float32 rows (n, dim)."""

    dim: int
    device: str

    def encode(self, texts: Sequence[str]) -> Matrix: ...


def _tokenizer(max_length: int, pad: bool = True) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(verified("minilm-tokenizer")))
    tok.enable_truncation(max_length=max_length)
    if pad:
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
    else:
        tok.no_padding()  # the file may carry a padding setting of its own
    return tok


CHUNK = 32  # texts per model call after sorting by length


def _by_length(encoded: Sequence[Any]) -> list[dict[str, npt.NDArray[np.int64]]]:
    """Unpadded encodings -> model inputs in chunks of :data:`CHUNK` texts of similar
    length (the caller sorted them), each padded only to its own longest text: a batch of
    256 tickets padded as one came to 1.8x the real tokens (bench/text.py)."""
    chunks = []
    for start in range(0, len(encoded), CHUNK):
        part = encoded[start : start + CHUNK]
        width = max(len(e.ids) for e in part)
        ids = np.zeros((len(part), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for r, e in enumerate(part):
            n = len(e.ids)
            ids[r, :n] = e.ids
            mask[r, :n] = 1
            types[r, :n] = e.type_ids
        chunks.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return chunks


def _batch(tok: Any, texts: Sequence[str]) -> dict[str, npt.NDArray[np.int64]]:
    encoded = tok.encode_batch(list(texts))
    return {
        "input_ids": np.asarray([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encoded], dtype=np.int64),
        "token_type_ids": np.asarray([e.type_ids for e in encoded], dtype=np.int64),
    }


def onnx_path(cache_dir: Path) -> Path:
    """Where the int8 model is cached: named after the weights' sha256 it came from."""
    from streamml.models.weights import WEIGHTS

    return cache_dir / "models" / f"{MODEL_ID}-{WEIGHTS['minilm'].sha256[:12]}.onnx"


def export_int8(cache_dir: Path) -> Path:
    """Export the packaged MiniLM to ONNX (pooled, normalised) and quantize it int8 per
    channel; idempotent (an existing file whose recorded sha256 still matches is kept)."""
    target = onnx_path(cache_dir)
    stamp = target.with_suffix(".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == sha256_of(target):
        return target
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    weights_dir = verified("minilm").parent
    verified("minilm-tokenizer")
    model = AutoModel.from_pretrained(str(weights_dir), local_files_only=True).eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: Any, mask: Any, types: Any) -> Any:
            hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        fp32 = Path(scratch) / "fp32.onnx"
        sample = torch.ones((2, 8), dtype=torch.int64)
        axes = {0: "batch", 1: "tokens"}
        with torch.no_grad():
            torch.onnx.export(
                Pooled(),
                (sample, sample, torch.zeros_like(sample)),
                str(fp32),
                input_names=["input_ids", "attention_mask", "token_type_ids"],
                output_names=["embedding"],
                dynamic_axes={
                    "input_ids": axes,
                    "attention_mask": axes,
                    "token_type_ids": axes,
                    "embedding": {0: "batch"},
                },
                opset_version=17,
                dynamo=False,
            )
        int8 = Path(scratch) / "int8.onnx"
        quiet = logging.getLogger()  # the quantizer logs advice on the root logger
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
        finally:
            quiet.setLevel(level)
        digest = sha256_of(int8)
        written = Path(scratch) / "stamp"
        written.write_text(digest + "\n")
        os.replace(int8, target)  # both atomic: a concurrent exporter writes the same
        os.replace(written, stamp)
    log.info("exported %s to %s", MODEL_ID, target)
    return target


class OnnxEncoder:
    """The int8 model on onnxruntime's CPU provider."""

    dim = DIM
    device = "cpu"

    def __init__(self, cache_dir: Path, *, max_length: int = 128, threads: int = 1) -> None:
        import onnxruntime as ort

        path = export_int8(cache_dir)
        stamp = path.with_suffix(".sha256").read_text().strip()
        if sha256_of(path) != stamp:  # changed on disk since it was exported
            path.unlink()
            path = export_int8(cache_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.tok = _tokenizer(max_length, pad=False)
        self.path = path

    def encode(self, texts: Sequence[str]) -> Matrix:
        """Rows in the order of ``texts``; computed in chunks of texts sorted by length."""
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        encoded = self.tok.encode_batch(list(texts))
        order = np.argsort([len(e.ids) for e in encoded], kind="stable")
        chunks = _by_length([encoded[i] for i in order])
        for n, inputs in enumerate(chunks):
            rows = order[n * CHUNK : (n + 1) * CHUNK]
            out[rows] = self.session.run(None, inputs)[0]
        return out


class TorchEncoder:
    """fp16 on CUDA, tokenizing the next chunk in a thread while the GPU runs this one
    (on a GPU the tokenizer, not the model, bounds throughput). ``device="cpu"`` runs the
    same code in fp32: how it is tested where there is no GPU."""

    dim = DIM

    def __init__(self, *, max_length: int = 128, chunk: int = 256, device: str = "cuda") -> None:
        import torch
        from transformers import AutoModel

        weights_dir = verified("minilm").parent
        self.torch = torch
        self.device = device
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.model = (
            AutoModel.from_pretrained(str(weights_dir), local_files_only=True)
            .to(device, dtype=dtype)
            .eval()
        )
        self.tok = _tokenizer(max_length)
        self.chunk = chunk
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize")

    def encode(self, texts: Sequence[str]) -> Matrix:
        torch = self.torch
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        chunks = [texts[i : i + self.chunk] for i in range(0, len(texts), self.chunk)]
        ahead: list[Future[dict[str, npt.NDArray[np.int64]]]] = [
            self.pool.submit(_batch, self.tok, c) for c in chunks
        ]
        rows = []
        with torch.inference_mode():
            for fut in ahead:
                b = {
                    k: torch.from_numpy(v).to(self.device, non_blocking=True)
                    for k, v in fut.result().items()
                }
                hidden = self.model(**b)[0]
                m = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-4)
                rows.append(torch.nn.functional.normalize(pooled.float(), dim=1).cpu().numpy())
        return np.concatenate(rows).astype(np.float32)


_encoders: dict[tuple[str, int, int], Encoder] = {}
_encoders_lock = threading.Lock()


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install is "no GPU", not a crash
        return False


def load_encoder(
    cache_dir: Path, *, device: Device = "auto", max_length: int = 128, threads: int = 1
) -> Encoder:
    """The process's encoder for these options (one per process: the model is shared by
    every pipeline and stage). ``device: cuda`` without a GPU is a :class:`ModelError`."""
    use = "cuda" if device == "cuda" or (device == "auto" and cuda_available()) else "cpu"
    if use == "cuda" and not cuda_available():
        raise ModelError(
            "text.device is cuda but torch sees no GPU", hint="use device: auto or cpu"
        )
    key = (use, max_length, threads)
    with _encoders_lock:
        found = _encoders.get(key)
        if found is None:
            found = (
                TorchEncoder(max_length=max_length)
                if use == "cuda"
                else OnnxEncoder(cache_dir, max_length=max_length, threads=threads)
            )
            _encoders[key] = found
            log.info("text encoder %s on %s", MODEL_ID, use)
        return found


def text_key(text: str) -> bytes:
    """The cache key of a text: 16 bytes of its sha256."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]


class Embedder:
    """An encoder behind an LRU cache of ``size`` texts (by hash), with the texts of a
    batch de-duplicated, so each distinct text is embedded once.

    >>> class Fake:
    ...     dim, device, calls = 2, "cpu", []
    ...     def encode(self, texts):
    ...         self.calls.append(list(texts))
    ...         return np.asarray([[len(t), 1.0] for t in texts], dtype=np.float32)
    >>> e = Embedder(Fake(), size=10)
    >>> e.embed(["ab", "ab", "c"]).tolist()
    [[2.0, 1.0], [2.0, 1.0], [1.0, 1.0]]
    >>> _ = e.embed(["c", "dd"]); e.encoder.calls
    [['ab', 'c'], ['dd']]
    >>> e.hits, e.misses
    (2, 3)
    """

    def __init__(self, encoder: Encoder, size: int = 20_000) -> None:
        self.encoder = encoder
        self.size = size
        self.cache: OrderedDict[bytes, Matrix] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.encode_s = 0.0
        self.lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def embed(self, texts: Sequence[str]) -> Matrix:
        import time

        keys = [text_key(t) for t in texts]
        out = np.empty((len(texts), self.encoder.dim), dtype=np.float32)
        todo: dict[bytes, list[int]] = {}
        with self.lock:
            for i, k in enumerate(keys):
                row = self.cache.get(k)
                if row is not None:
                    self.cache.move_to_end(k)
                    out[i] = row
                    self.hits += 1
                elif k in todo:
                    todo[k].append(i)
                    self.hits += 1
                else:
                    todo[k] = [i]
                    self.misses += 1
        if todo:
            firsts = [idx[0] for idx in todo.values()]
            t0 = time.perf_counter()
            rows = self.encoder.encode([texts[i] for i in firsts])
            self.encode_s += time.perf_counter() - t0
            with self.lock:
                for (k, idx), row in zip(todo.items(), rows, strict=True):
                    out[idx] = row
                    self.cache[k] = row
                while len(self.cache) > self.size:
                    self.cache.popitem(last=False)
        return out
