"""Calibration windows: ``nsamples`` non-overlapping windows of ``seqlen`` tokens drawn with a seed.

Sources: a text file (``--calib-file``), or ``wikitext2`` / ``c4`` validation text through the
``datasets`` library where the user has it (and a network or a cache). Use validation text for
calibration; keep test text for evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CalibrationError, InvalidArgument

DATASETS = ("wikitext2", "c4")


@dataclass
class Calibration:
    """Token windows ``[nsamples, seqlen]`` and a description recorded in the checkpoint."""

    windows: torch.Tensor
    description: dict


def tokenize_text(tokenizer, text: str, add_special_tokens: bool = False) -> torch.Tensor:
    """Token ids of a whole text as one 1-D LongTensor."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than model max length" does not apply here
    try:
        ids = tokenizer(text, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


def read_text_file(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"text file {p} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read text file {p} as UTF-8: {e}") from None


def dataset_text(name: str) -> str:
    """Validation text of a named dataset through ``datasets``; a clear error when it cannot be had."""
    if name not in DATASETS:
        raise InvalidArgument(f"unknown calibration dataset {name!r}; choose {', '.join(DATASETS)} or give --calib-file")
    try:
        import datasets  # optional dependency
    except ImportError:
        raise CalibrationError(f"calibration from {name} needs the 'datasets' package and a network or cache; "
                               "offline, give a text file with --calib-file (e.g. WikiText-2 validation)") from None
    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="validation")["text"]
            return "\n\n".join(rows)
        rows = datasets.load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                     split="validation")["text"]
        return "\n\n".join(rows[:3000])
    except Exception as e:  # network, cache and hub errors all mean "not available here"
        raise CalibrationError(f"could not load {name} through datasets ({type(e).__name__}); offline, give "
                               "a text file with --calib-file") from None


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str = "the text") -> torch.Tensor:
    """``nsamples`` distinct non-overlapping windows of ``seqlen`` tokens, chosen with ``seed``."""
    if nsamples < 1 or seqlen < 2:
        raise InvalidArgument(f"--nsamples must be >= 1 and --seqlen >= 2 (got {nsamples}, {seqlen})")
    available = ids.numel() // seqlen
    if nsamples > available:
        raise CalibrationError(
            f"{what} has {ids.numel()} tokens: it gives only {available} windows of {seqlen} tokens, "
            f"not {nsamples}; lower --nsamples or --seqlen, or give a longer text"
        )
    gen = torch.Generator().manual_seed(seed)
    slack = ids.numel() - available * seqlen
    offset = int(torch.randint(0, slack + 1, (1,), generator=gen))
    picks = torch.randperm(available, generator=gen)[:nsamples]
    starts = offset + picks * seqlen
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_windows(tokenizer, *, file: str | os.PathLike | None = None, dataset: str | None = None,
                        text: str | None = None, nsamples: int = 128, seqlen: int = 512, seed: int = 0) -> Calibration:
    """Calibration windows from exactly one of ``file``, ``dataset`` or ``text``."""
    given = [x is not None for x in (file, dataset, text)]
    if sum(given) != 1:
        raise CalibrationError("give calibration text: --calib-file FILE (offline) or --calib-dataset wikitext2|c4")
    if file is not None:
        body, source = read_text_file(file), {"file": Path(file).name}
    elif dataset is not None:
        body, source = dataset_text(dataset), {"dataset": dataset}
    else:
        body, source = text, {"text_chars": len(text)}
    ids = tokenize_text(tokenizer, body)
    what = f"calibration {source.get('file', source.get('dataset', 'text'))}"
    windows = sample_windows(ids, nsamples, seqlen, seed, what)
    return Calibration(windows, {**source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                                 "text_tokens": int(ids.numel())})
