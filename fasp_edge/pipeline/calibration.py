"""Calibration windows: ``nsamples`` windows of ``seqlen`` tokens, drawn with a seed.

Sources: a text file (``--calib-file``), ``wikitext2`` / ``c4`` validation text through the ``datasets``
library where the user has it (and a network or a cache), or, with no text at all, text sampled from
the model itself (:func:`self_generated_windows`), so any model can be pruned offline. Use validation
text for calibration; keep test text for evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CalibrationError, InvalidArgument

DATASETS = ("wikitext2", "c4")
SELF_TEMPERATURE = 1.0  # sample from the model's own next-token distribution, unsharpened
# Rows sampled at once. SmolLM2-135M, 2 cores, one decode step of the model with a DynamicCache of 10-60
# positions (2026-12-05): 84 tok/s at batch 4, 131 at 8, 240 at 16, 378 at 32. The batch is capped so that its KV cache
# stays within SELF_CACHE_BYTES (the cap depends on the config only, so the same seed gives the same windows).
SELF_BATCH = 32
SELF_CACHE_BYTES = 1 << 30
SELF_SAMPLER = "inverse-cdf"  # recorded with the windows: draws of the same seed differ between samplers


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


@torch.no_grad()
def self_generated_windows(model: torch.nn.Module, tokenizer, *, nsamples: int = 128, seqlen: int = 512,
                           seed: int = 0, temperature: float = SELF_TEMPERATURE, batch_size: int = SELF_BATCH,
                           progress: bool = True) -> Calibration:
    """Data-free calibration: ``nsamples`` sequences sampled from ``model`` itself, each starting at BOS.

    Every window is the start token followed by ``seqlen - 1`` tokens drawn from the model's next-token
    distribution at ``temperature`` (plain sampling, no top-k; an end-of-sequence token does not stop a
    sample, the model goes on as it would after a document). Batched with a KV cache; the draws come
    from one ``torch.Generator`` seeded with ``seed``, so the same seed gives the same windows.
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    if nsamples < 1 or seqlen < 2:
        raise InvalidArgument(f"--nsamples must be >= 1 and --seqlen >= 2 (got {nsamples}, {seqlen})")
    if temperature <= 0:
        raise InvalidArgument(f"the sampling temperature must be > 0, got {temperature}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise InvalidArgument(f"--seqlen {seqlen} exceeds the model's {limit} positions; lower it")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("the tokenizer has neither a BOS nor an EOS token to start self-generated "
                               "calibration from; give calibration text with --calib-file")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch_size = _sampling_batch(model.config, seqlen, batch_size)
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(total=nsamples * (seqlen - 1), desc="self-generated calibration", unit="tok", disable=not progress,
               leave=False)
    for first in range(0, nsamples, batch_size):
        b = min(batch_size, nsamples - first)
        seq = torch.full((b, seqlen), start, dtype=torch.long)
        cache = DynamicCache()
        for i in range(1, seqlen):
            logits = model(seq[:, i - 1 : i].to(device), past_key_values=cache, use_cache=True).logits[:, -1]
            seq[:, i] = sample_tokens(logits.float().cpu() / temperature, gen)
            bar.update(b)
        out.append(seq)
    bar.close()
    model.train(was_training)
    windows = torch.cat(out)
    return Calibration(windows, {"self_generated": True, "temperature": temperature, "start_token": int(start),
                                 "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "sampler": SELF_SAMPLER,
                                 "batch": min(batch_size, nsamples)})


def sample_tokens(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` ``[b, V]``, drawn from ``softmax(logits)`` by inverting its CDF (in float64)
    at one uniform draw of ``gen`` per row. A token of probability 0 is never drawn. ``torch.multinomial`` draws
    the same distribution but costs ~1.2 ms per row of SmolLM2's 49152 logits on this 2-core machine, as much
    as a third of a batched decode step; this costs about a twentieth of that (0.07 ms per row)."""
    cdf = torch.softmax(logits, dim=-1).double().cumsum(dim=-1)
    u = torch.rand(logits.shape[0], 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)


def _sampling_batch(config, seqlen: int, batch_size: int) -> int:
    """``batch_size``, lowered so that one batch's fp32 KV cache of ``seqlen`` positions fits SELF_CACHE_BYTES."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    hidden, n_heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if not (layers and heads and hidden and n_heads):
        return batch_size
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    per_row = 2 * layers * heads * head_dim * seqlen * 4
    return max(1, min(batch_size, SELF_CACHE_BYTES // per_row))
