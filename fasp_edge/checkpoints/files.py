"""What every checkpoint reader and writer shares: the finite-weights check and the tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import NonFiniteWeights


def check_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteWeights(f"parameter {name} holds NaN or Inf values; the checkpoint is corrupt — "
                                   "re-download or re-convert it")


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save a tokenizer; fast tokenizers as ``tokenizer.json`` only (no large legacy slow-tokenizer files).

    An empty normalizer ``Sequence`` (left by transformers' GGUF tokenizer conversion) is written as
    ``null``: the two are the same identity map, but ExecuTorch's C++ tokenizer refuses the former.
    """
    if getattr(tokenizer, "is_fast", False):
        tokenizer.save_pretrained(folder, legacy_format=False)
    else:
        tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        spec = json.loads(path.read_text(encoding="utf-8"))
        changed = False
        for key, inner in (("normalizer", "normalizers"), ("pre_tokenizer", "pretokenizers")):
            part = spec.get(key)
            if isinstance(part, dict) and part.get("type") == "Sequence" and not part.get(inner):
                spec[key] = None
                changed = True
        if changed:
            path.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
