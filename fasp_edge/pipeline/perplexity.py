"""Perplexity with the standard LLM protocol.

The whole text is tokenized once, without special tokens (a tokenizer that adds a BOS would
otherwise shift every window by one token; this reproduces the reference 29.93 of SmolLM2-135M-Instruct
over the first 64 windows of WikiText-2 test); it is cut into non-overlapping windows of ``seqlen`` tokens (a
trailing partial window is dropped); each window is scored independently; perplexity is
``exp(mean token NLL)`` over every predicted token of the full windows (``seqlen - 1`` per window).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import InvalidArgument
from .calibration import tokenize_text


def _windows(tokenizer, text: str, seqlen: int, max_windows: int | None) -> tuple[torch.Tensor, int]:
    if seqlen < 2:
        raise InvalidArgument(f"--seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise InvalidArgument(f"--max-windows must be >= 1, got {max_windows}")
    ids = tokenize_text(tokenizer, text, add_special_tokens=False)
    windows = ids.numel() // seqlen
    if windows == 0:
        raise InvalidArgument(f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
                              "lower --seqlen or give a longer text")
    return ids, windows if max_windows is None else min(windows, max_windows)


def _result(total: float, windows: int, seqlen: int) -> dict:
    predicted = windows * (seqlen - 1)
    nll = total / predicted
    return {"perplexity": math.exp(nll), "nll": nll, "windows": windows, "tokens": windows * seqlen,
            "predicted_tokens": predicted, "seqlen": seqlen}


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, text: str, *, seqlen: int = 512, max_windows: int | None = None,
               device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``text``; returns ``perplexity``, ``nll``, ``windows``, ``tokens``.

    ``tokens`` counts the tokens fed in (``windows · seqlen``), ``predicted_tokens`` those scored.
    """
    ids, windows = _windows(tokenizer, text, seqlen, max_windows)
    model.eval()
    device = torch.device(device)
    total = 0.0
    for i in tqdm(range(windows), desc="perplexity", disable=not progress, leave=False):
        batch = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(batch, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, batch[0, 1:], reduction="sum").item()
    return _result(total, windows, seqlen)


def check_artifact_seqlen(seqlen: int, max_context: int | None) -> None:
    """A perplexity window must fit an artifact's fixed context."""
    if max_context is not None and seqlen > max_context:
        raise InvalidArgument(f"--seqlen {seqlen} is longer than the artifact's context of {max_context} tokens; "
                              f"lower --seqlen to {max_context} or re-export with --max-context {seqlen}")


@torch.no_grad()
def step_perplexity(step: Callable[[torch.Tensor, int], torch.Tensor], tokenizer, text: str, *, seqlen: int = 512,
                    max_windows: int | None = None, max_context: int | None = None, progress: bool = True) -> dict:
    """:func:`perplexity` through an exported artifact's runtime, on the same windows.

    ``step(tokens, start) -> logits [vocab]`` is the artifact's ``forward(tokens, input_pos)``; every window
    is fed one token per call from position 0, exactly as an app decodes, and each call's logits score the
    next token.
    """
    check_artifact_seqlen(seqlen, max_context)
    ids, windows = _windows(tokenizer, text, seqlen, max_windows)
    total = 0.0
    bar = tqdm(total=windows * (seqlen - 1), desc="perplexity (artifact)", unit="tok", disable=not progress,
               leave=False)
    for i in range(windows):
        row = ids[i * seqlen : (i + 1) * seqlen]
        for t in range(seqlen - 1):
            logits = step(row[t : t + 1], t).float()
            total -= float(torch.log_softmax(logits, -1)[row[t + 1]])
            bar.update(1)
    bar.close()
    return _result(total, windows, seqlen)


def compare_log_probs(ref: torch.Tensor, got: torch.Tensor) -> tuple[int, float]:
    """Positions where the top-1 tokens of log-probabilities ``ref`` and ``got`` ``[n, V]`` agree, and the
    summed ``KL(p_ref || p_got)`` over them (nats)."""
    return int((ref.argmax(-1) == got.argmax(-1)).sum()), float((ref.exp() * (ref - got)).sum())


@torch.no_grad()
def agreement(reference: torch.nn.Module, model: torch.nn.Module, windows: torch.Tensor, *,
              device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """How closely ``model`` follows ``reference`` (e.g. the dense model) on token ``windows`` ``[n, seqlen]``.

    Fidelity without a dataset: on held-out self-generated text (a seed not used for calibration), the
    share of positions where both models' top-1 next tokens agree, and the mean KL divergence
    ``KL(p_reference || p_model)`` of their next-token distributions (nats per token), over every position.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise InvalidArgument("agreement needs token windows of shape [n, seqlen >= 2]")
    reference.eval()
    model.eval()
    device = torch.device(device)
    same = 0
    kl = 0.0
    for row in tqdm(windows, desc="agreement", disable=not progress, leave=False):
        batch = row.unsqueeze(0).to(device)
        ref = torch.log_softmax(reference(batch, use_cache=False).logits[0].float(), dim=-1)
        got = torch.log_softmax(model(batch, use_cache=False).logits[0].float(), dim=-1)
        s, k = compare_log_probs(ref, got)
        same, kl = same + s, kl + k
    positions = windows.shape[0] * windows.shape[1]
    return {"top1_agreement": same / positions, "mean_kl": kl / positions, "windows": int(windows.shape[0]),
            "positions": positions}
