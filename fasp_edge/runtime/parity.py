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


def reference_logits(model: nn.Module, prompt: torch.Tensor, steps: int,
                     follow: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The transformers ``model``'s logits over a prefill of ``prompt`` (``[T, V]``) and then ``steps`` greedy
    decode steps on its own tokens (``[1, V]`` each): what :func:`logits_parity` compares a candidate with,
    computed once (e.g. before the model is quantized in place). ``follow``: decode the tokens those logits chose
    greedily instead of the model's own."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        ref = [model(prompt, past_key_values=cache, use_cache=True).logits[0]]  # [T, V]
        for i in range(steps):
            tok = (follow[i] if follow is not None else ref[-1])[-1].argmax().view(1, 1)
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
    return compare_logits(candidate_logits(step, prompt, ref), ref, prompt.shape[1])


def candidate_logits(step: Step, prompt: torch.Tensor, reference: list[torch.Tensor]) -> list[torch.Tensor]:
    """``step``'s logits over a prefill of ``prompt`` and then the tokens ``reference`` chose greedily, each as
    ``[rows, V]`` float32 (rows: the prefill's, or 1)."""
    with torch.no_grad():
        got = [step(prompt, 0)]
        pos = prompt.shape[1]
        for r in reference[:-1]:
            got.append(step(r[-1].argmax().view(1, 1), pos))
            pos += 1
    return [g.float().reshape(-1, r.shape[-1]) for g, r in zip(got, reference)]


def compare_logits(got: list[torch.Tensor], ref: list[torch.Tensor], prefill_tokens: int) -> dict:
    """:func:`logits_parity`'s figures of candidate logits ``got`` (:func:`candidate_logits`) against ``ref``."""
    rows = [(g, r[-g.shape[0]:]) for g, r in zip(got, ref)]  # a last-token step compares the last row
    steps = len(ref) - 1
    diffs = [(g - r).abs().max().item() for g, r in rows]
    same = sum(int(g[-1].argmax() == r[-1].argmax()) for g, r in rows)
    scale = max(r.abs().max().item() for _, r in rows)
    return {"prefill_tokens": prefill_tokens, "decode_steps": steps, "max_abs_logit": scale,
            "tolerance": parity_tolerance(scale), "prefill_max_abs_diff": diffs[0],
            "decode_max_abs_diff": max(diffs[1:], default=0.0), "max_abs_diff": max(diffs),
            "greedy_token_agreement": same / len(rows), "greedy_tokens_equal": same == len(rows)}


def check_export_parity(model: nn.Module, decoder, prompt: torch.Tensor, steps: int,
                        referee: bool = False) -> dict:
    """:func:`logits_parity` of an :class:`~fasp_edge.models.decoder.ExportDecoder` (either cache mode) run eagerly.

    ``referee``: where the decoder is further from the float32 model than :func:`parity_tolerance`, ask
    :func:`float64_referee` whether that is the model's own float32 rounding (then ``"passed"`` is true)."""
    ref = reference_logits(model, prompt, steps)
    got = candidate_logits(decoder.stepper(), prompt, ref)
    parity = compare_logits(got, ref, prompt.shape[1])
    parity["passed"] = parity["max_abs_diff"] <= parity["tolerance"]
    if referee and not parity["passed"]:
        parity["float64"] = float64_referee(model, prompt, ref, got, parity["tolerance"])
        parity["passed"] = parity["float64"].get("passed", False)
    return parity


#: the referee accepts a candidate no further from the float64 computation than this many times the float32
#: model is (or than :func:`parity_tolerance`)
REFEREE_FACTOR = 2.0


def float64_referee(model: nn.Module, prompt: torch.Tensor, reference: list[torch.Tensor],
                    got: list[torch.Tensor], tolerance: float) -> dict:
    """Whether a candidate's logits ``got`` (:func:`candidate_logits`) that miss ``tolerance``
    (:func:`parity_tolerance` of the reference) against the float32 ``model``'s ``reference`` are its float32
    rounding: the model is run in float64 over the same tokens (its parameters converted in place, then back to
    float32, which is exact), and the candidate passes if it is no further from that than
    :data:`REFEREE_FACTOR` times the float32 model is, or than ``tolerance``.
    A deep model with large activations (Qwen2.5-Coder-1.5B: 1.69e-4 from float64 where the tolerance of its
    logits is 1.14e-4) needs it. Needs memory for a float64 copy of the weights; where that is not free, or the
    model is not all float32, says so (``"skipped"``) instead."""
    import psutil

    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        return {"skipped": "the model is not all float32"}
    need = 8 * sum(t.numel() for t in tensors if t.is_floating_point())
    free = psutil.virtual_memory().available
    if need > 0.8 * free:
        return {"skipped": f"a float64 copy of the weights needs {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB "
                           "is available"}
    try:
        model.double()
        exact = reference_logits(model, prompt, len(reference) - 1, follow=reference)
    finally:
        model.float()

    def dist(rows: list[torch.Tensor]) -> float:
        return max((x.double() - e[-x.shape[0]:]).abs().max().item() for x, e in zip(rows, exact))

    own, cand = dist([r.reshape(-1, r.shape[-1]) for r in reference]), dist(got)
    tolerance = max(tolerance, REFEREE_FACTOR * own)
    return {"model_vs_float64": own, "candidate_vs_float64": cand, "tolerance": tolerance,
            "rule": f"max(parity tolerance, {REFEREE_FACTOR:g} x the float32 model's distance from float64)",
            "passed": cand <= tolerance}
