"""The text encoder on a GPU: TorchEncoder (fp16, tokenizing ahead) against the raw model.

    ~/.cache/streamml/venv/bin/python bench/gpu_embeddings.py [--device cuda] [--texts 4096]

Synthetic tickets (``streamml.models.tickets``, seed 11), embedded in batches of
``--batch`` (default 256):

* raw: tokenize a batch, then run the model on it, one after the other (what a plain
  ``transformers`` loop does);
* encoder: ``TorchEncoder.encode`` on the same batches (the next chunk is tokenized in a
  thread while the model runs this one);
* agreement: cosine between the encoder's rows and the int8 ONNX encoder's on the CPU.

The two arms alternate batch by batch after a warm-up. ``--device cpu`` runs the same code
in fp32 on the CPU (a dry run of this script where no GPU is lent). Prints ``key=value``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from streamml.config import Settings
from streamml.models.embeddings import TorchEncoder, _batch, load_encoder
from streamml.models.tickets import tickets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--texts", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU visible to torch: run with --device cpu for a dry run", file=sys.stderr)
        return 2
    texts = [str(e.record["body"]) for e in tickets(args.texts, seed=11)]  # type: ignore[index]
    batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
    enc = TorchEncoder(chunk=args.batch, device=args.device)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def raw(batch: list[str]) -> None:
        with torch.inference_mode():
            b = {k: torch.from_numpy(v).to(args.device) for k, v in _batch(enc.tok, batch).items()}
            enc.model(**b)[0].float().cpu()

    for b in batches[:2]:  # warm-up: kernels, allocator, tokenizer threads
        raw(b)
        enc.encode(b)
    raw_s = enc_s = tok_s = 0.0
    for b in batches:
        sync()
        t0 = time.perf_counter()
        _batch(enc.tok, b)
        tok_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        raw(b)
        sync()
        raw_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        enc.encode(b)
        sync()
        enc_s += time.perf_counter() - t0
    n = len(texts)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"device={args.device} name={name.replace(' ', '_')} texts={n} batch={args.batch}")
    print(f"raw_texts_per_s={n / raw_s:.0f}")
    print(f"encoder_texts_per_s={n / enc_s:.0f}")
    print(f"ratio_encoder_over_raw={raw_s / enc_s:.2f}")
    print(f"tokenize_share_of_raw={tok_s / raw_s:.2f}")
    sample = texts[:256]
    cpu = load_encoder(Settings().cache_dir, device="cpu").encode(sample)
    cosine = (enc.encode(sample) * cpu).sum(axis=1)
    print(f"cosine_vs_int8_cpu_min={float(np.min(cosine)):.4f}")
    print(f"cosine_vs_int8_cpu_median={float(np.median(cosine)):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
