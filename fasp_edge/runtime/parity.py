"""The one parity rule: how close an artifact's logits must be to the PyTorch model's.

Every check goes through :func:`logits_parity`: the PyTorch model and the candidate (an exported ``.pte`` or
ONNX graph opened by this runtime, or the export decoder itself) read one seeded prompt, then
``steps`` greedy decode steps on the model's own tokens; the largest |Δlogits| over the compared rows is held
to :func:`parity_tolerance`. fp32 artifacts must pass it; quantized ones record it (their quality is measured
by perplexity, :func:`fasp_edge.export.bundle.artifact_quality`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

PARITY_TOLERANCE = 1e-4  # fp32 max |Δlogits| allowed between an artifact and the PyTorch model ...
PARITY_RELATIVE = 5e-6  # ... or this fraction of the largest |logit|, where logits are large (float32 rounding)

Step = Callable[[torch.Tensor, int], torch.Tensor]  # step(tokens, start) -> logits [V] (or [T, V] for every position)


def parity_prompt(vocab_size: int, length: int = 64, seed: int = 0) -> torch.Tensor:
    """A fixed, seeded prompt of ordinary token ids for parity checks."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, length), generator=g)


def parity_tolerance(max_abs_logit: float) -> float:
    """The largest fp32 max |Δlogits| a check accepts for logits as large as ``max_abs_logit``."""
    return max(PARITY_TOLERANCE, PARITY_RELATIVE * max_abs_logit)


def reference_logits(model: nn.Module, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The transformers ``model``'s logits over a prefill of ``prompt`` (``[T, V]``) and then ``steps`` greedy
    decode steps on its own tokens (``[1, V]`` each): what :func:`logits_parity` compares a candidate with,
    computed once (e.g. before the model is quantized in place)."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        ref = [model(prompt, past_key_values=cache, use_cache=True).logits[0]]  # [T, V]
        for _ in range(steps):
            tok = ref[-1][-1].argmax().view(1, 1)
            ref.append(model(tok, past_key_values=cache, use_cache=True).logits[0])
    return ref


def logits_parity(model: nn.Module | None, step: Step, prompt: torch.Tensor, steps: int,
                  reference: list[torch.Tensor] | None = None) -> dict:
    """Compare ``step`` with the transformers ``model`` over a prefill of ``prompt`` and ``steps`` greedy decode
    steps (the model's own greedy tokens are fed to both); ``reference``: the model's
    :func:`reference_logits`, computed earlier (then ``model`` is not used).

    ``step`` returns the last position's logits ``[V]``, or every position's ``[T, V]`` (then every prefill row
    is compared). The tolerance scales with the largest |logit| of the compared reference rows.
    """
    ref = reference if reference is not None else reference_logits(model, prompt, steps)
    if len(ref) != steps + 1:
        raise ValueError(f"the reference holds {len(ref) - 1} decode steps, not {steps}")
    with torch.no_grad():
        got = [step(prompt, 0)]
        pos = prompt.shape[1]
        for r in ref[:-1]:
            got.append(step(r[-1].argmax().view(1, 1), pos))
            pos += 1
    rows = [(g.float().reshape(-1, r.shape[-1]), r) for g, r in zip(got, ref)]
    rows = [(g, r[-g.shape[0]:]) for g, r in rows]  # a last-token step compares the last row
    diffs = [(g - r).abs().max().item() for g, r in rows]
    same = sum(int(g[-1].argmax() == r[-1].argmax()) for g, r in rows)
    scale = max(r.abs().max().item() for _, r in rows)
    return {"prefill_tokens": prompt.shape[1], "decode_steps": steps, "max_abs_logit": scale,
            "tolerance": parity_tolerance(scale), "prefill_max_abs_diff": diffs[0],
            "decode_max_abs_diff": max(diffs[1:], default=0.0), "max_abs_diff": max(diffs),
            "greedy_token_agreement": same / len(rows), "greedy_tokens_equal": same == len(rows)}


def check_export_parity(model: nn.Module, decoder, prompt: torch.Tensor, steps: int) -> dict:
    """:func:`logits_parity` of an :class:`~fasp_edge.models.decoder.ExportDecoder` (either cache mode) run eagerly."""
    return logits_parity(model, decoder.stepper(), prompt, steps)
