"""Pruned checkpoints: a folder with ``config.json`` (source config + ``fasp`` section),
``model.safetensors`` (the smaller dense tensors) and the tokenizer files.

Where the pruned model is still a standard architecture (one FFN width for all layers and value head
dim equal to the Q/K head dim, e.g. ``--targets mlp``), the config's FFN width is updated so plain
``transformers.AutoModelForCausalLM`` loads the folder too; otherwise use :func:`load_pruned`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import ModelLoadError
from ..fsutil import atomic_output_dir
from ..models import family_for
from ..models.base import reshape_layer
from .files import check_finite, save_tokenizer

FORMAT_VERSION = 1


def fasp_section(model: torch.nn.Module, *, method: str, sparsity: float, extra: dict[str, Any] | None = None) -> dict:
    """The ``fasp`` config section describing a pruned model's per-layer shapes."""
    family = family_for(model)
    ffn_dims = family.ffn_dims(model)
    v_dims = family.v_head_dims(model)
    head_dim = family.head_dim(model)
    return {
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "method": method,
        "sparsity": sparsity,
        "ffn_dims": ffn_dims,
        "v_head_dims": v_dims,
        "head_dim": head_dim,
        "standard_architecture": len(set(ffn_dims)) == 1 and all(v == head_dim for v in v_dims),
        **(extra or {}),
    }


def save_pruned(model: torch.nn.Module, tokenizer: Any, out: str | os.PathLike, section: dict, *,
                overwrite: bool = False, extra_files: dict[str, str] | None = None,
                copy_files: dict[str, Path] | None = None) -> Path:
    """Write a pruned checkpoint atomically; ``extra_files`` maps file names to text contents, ``copy_files``
    to files copied in (the source's ``tokenizer.model``)."""
    family = family_for(model)
    config = model.config
    previous = {k: getattr(config, k, None) for k in ("fasp", family.ffn_config_key)}
    config.fasp = section
    if section["standard_architecture"]:
        setattr(config, family.ffn_config_key, section["ffn_dims"][0])
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            # one file whatever the size (transformers shards from 5 GB: a pruned 1.5B model is 5.7 GB)
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1000GB")
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp)
            for name, body in (extra_files or {}).items():
                (tmp / name).write_text(body)
            for name, src in (copy_files or {}).items():
                shutil.copyfile(src, tmp / name)
    finally:
        for k, v in previous.items():
            if v is None and hasattr(config, k):
                delattr(config, k)
            elif v is not None:
                setattr(config, k, v)
    return Path(out)


def read_fasp_section(path: str | os.PathLike) -> dict:
    cfg = Path(path) / "config.json"
    try:
        config = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {cfg}: {e}") from None
    if "fasp" not in config:
        raise ModelLoadError(f"{path} is not a fasp-edge pruned checkpoint (config.json has no 'fasp' section); "
                             "load it with fasp_edge.load_model")
    return config["fasp"]


def _shards(folder: Path) -> list[Path]:
    """The files of a checkpoint that transformers sharded (``model.safetensors.index.json``; fasp-edge before
    2026-12-07 let checkpoints over 5 GB be split), all present, or []."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    return [folder / f for f in files] if files and all((folder / f).is_file() for f in files) else []


def load_pruned(path: str | os.PathLike) -> torch.nn.Module:
    """Load a pruned checkpoint written by :func:`save_pruned` (float32, CPU, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    folder = Path(path)
    section = read_fasp_section(folder)
    if section.get("format_version", 0) > FORMAT_VERSION:
        raise ModelLoadError(f"{folder} was written by a newer fasp-edge (format {section['format_version']}); "
                             "upgrade fasp-edge")
    weights = folder / "model.safetensors"
    shards = _shards(folder) if not weights.is_file() else [weights]
    if not shards:
        raise ModelLoadError(f"{folder} has no model.safetensors; the checkpoint is incomplete")
    config = AutoConfig.from_pretrained(folder)
    family = family_for(config)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layers = family.layers(model)
    if len(layers) != len(section["ffn_dims"]) or len(layers) != len(section["v_head_dims"]):
        raise ModelLoadError(f"{folder}: the fasp section lists {len(section['ffn_dims'])} layers, the config "
                             f"{len(layers)}; the checkpoint is corrupt")
    for layer, ffn, vdim in zip(layers, section["ffn_dims"], section["v_head_dims"]):
        reshape_layer(family, layer, ffn, vdim)
    state = {}
    for shard in shards:
        try:
            state.update(load_file(shard))
        except Exception as e:
            raise ModelLoadError(f"cannot read {shard}: {e}") from None
    # assign: the parameters take the loaded tensors instead of copying them (the peak stays one model, not two)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(f"{weights} does not match its config (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); the checkpoint is corrupt")
    model.tie_weights()
    model.eval()
    check_finite(model)
    return model
