"""Weight quantization of the 4-bit ExecuTorch artifact (``--quant 8da4w``), chosen by measured quality.

What the XNNPACK artifact computes: a Linear takes 8-bit dynamic per-token activations and 4-bit weights
in groups of 32 with one bf16 scale per group and NO zero point (XNNPACK's ``qd8-f32-qb4w``: the grid of a
group is ``d·{-8..7}``); a Linear whose input width is not a multiple of 32 takes 8-bit per-channel
weights. The token embedding is not an XNNPACK op; it becomes ExecuTorch's
``quantized_decomposed::embedding_4bit`` / ``embedding_byte`` kernel, which does take zero points.

Where the 1.6x perplexity of a plain torchao export came from (SmolLM2-135M-Instruct, WikiText-2 test;
``benchmarks/quant_quality.py`` measures each part alone): the 4-bit weights. SmolLM2 is published as
GGUF Q4_1, so its fp32 weights already lie on an asymmetric 4-bit grid ``m + d·{0..15}`` per group of 32;
re-quantizing them on a symmetric grid adds a second, full 4-bit error. 8-bit dynamic activations cost
~2.5%, the 4-bit LM head a few percent more.

The fix, :class:`GroupOffsetLinear`: asymmetric (min/max) 4-bit weights on XNNPACK's symmetric kernel,
``W = d·(q - 8) + c`` per group, computed as ``main(x) + offset(group_sum(x))``. It reproduces a GGUF
Q4_1/Q4_K weight up to the bf16 rounding of its scales, and for any other weight it is min/max 4-bit
quantization, half a bit finer than symmetric. Cost: two small extra Linears per 4-bit Linear (``in/32``
wide), about 1/16 more weight bytes, all inside the XNNPACK delegate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import InvalidArgument

GROUP_SIZE = 32
QPARAMS = ("asymmetric", "hqq_scale_only", "affine")
HEAD_PRECISIONS = ("8bit", "4bit")
EMBEDDING_PRECISIONS = ("none", "4bit", "8bit")


@dataclass
class Recipe:
    """How ``--quant 8da4w`` quantizes a model (recorded in the manifest).

    ``qparams``: ``asymmetric`` (min/max groups through :class:`GroupOffsetLinear`), or torchao's symmetric
    ``hqq_scale_only`` / ``affine``. ``lm_head`` / ``embedding``: the precision of those two tables (a tied
    embedding is quantized apart from the head: the two kernels read different layouts).
    ``keep_8bit``: Linear names (suffixes) kept at 8-bit per-channel weights.
    """

    qparams: str = "asymmetric"
    lm_head: str = "8bit"
    # fp32 by default: on SmolLM2's real weights ExecuTorch 1.4.1's quant fusion leaves the 4-bit (and 8-bit)
    # embedding's torchao::dequantize_affine unfused, which has no runtime kernel ("Missing out variants" at
    # to_executorch; random and stories260K embeddings fuse); until that is found, 4bit/8bit are opt-in
    embedding: str = "none"
    keep_8bit: list[str] = field(default_factory=list)

    def check(self) -> None:
        for what, value, allowed in (("qparams", self.qparams, QPARAMS), ("LM head precision", self.lm_head,
                                      HEAD_PRECISIONS), ("embedding precision", self.embedding, EMBEDDING_PRECISIONS)):
            if value not in allowed:
                raise InvalidArgument(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")


#: chosen by ``benchmarks/quant_quality.py`` (eager, WikiText-2 test, 4 x 512 tokens), perplexity / fp32:
#: SmolLM2 dense 1.023 (FASP-0.3 1.064) against 1.056 (1.126) with a 4-bit LM head and a 4-bit embedding,
#: 1.313 (1.287) for asymmetric's place taken by torchao's symmetric HQQ grid, 1.637 (1.623) for the landed default
DEFAULT_RECIPE = Recipe()


# ---------------------------------------------------------------------------------------------- asymmetric 4-bit
def _int_weight(w_int: torch.Tensor, scale: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """A torchao weight (8-bit dynamic activations) holding exactly the integers ``w_int`` and ``scale``."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    out, k = w_int.shape
    hp = (w_int.float().reshape(out, k // group, group) * scale[..., None]).reshape(out, k)
    return IntxUnpackedToInt8Tensor.from_hp(
        hp, (1, group), getattr(torch, f"int{bits}"), activation_quantization="int8_asym_per_token",
        intx_choose_qparams_algorithm=None, custom_scale=scale,
        custom_zero_point=torch.zeros_like(scale, dtype=torch.int8))


class GroupOffsetLinear(nn.Module):
    """An asymmetric 4-bit Linear on XNNPACK's symmetric 4-bit kernel: ``main(x) + offset(group_sum(x))``.

    A group's asymmetric grid ``m + d·{0..15}`` is ``d·(q - 8) + c`` with ``c = m + 8d``: ``main`` holds
    ``d·(q - 8)`` (4-bit, symmetric), ``group_sum`` is a constant 0/1 matrix ``[in/32, in]`` that sums each
    group of 32 input channels (8-bit with scale 1: exact) and ``offset`` ``[out, in/32]`` (8-bit per
    channel) adds ``c`` times those sums. Build it with :func:`to_group_offset`.
    """

    def __init__(self, main: nn.Linear, group_sum: nn.Linear, offset: nn.Linear):
        super().__init__()
        self.main, self.group_sum, self.offset = main, group_sum, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.offset(self.group_sum(x))


def asymmetric_4bit(w: torch.Tensor, group: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max 4-bit quantization of ``w [out, in]`` in groups along ``in``, split for :class:`GroupOffsetLinear`.

    Returns ``(q - 8 as int8, d [out, in/group] (bf16-exact, as XNNPACK stores it), c [out, in/group])`` with
    ``w ≈ d·(q - 8) + c``. A weight that already lies on such a grid (a dequantized GGUF Q4_1 tensor) is
    reproduced up to the bf16 rounding of ``d``.
    """
    out, k = w.shape
    g = w.detach().float().reshape(out, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / 15).clamp(min=1e-10).to(torch.bfloat16).float()
    q = torch.clamp(torch.round((g - lo[..., None]) / d[..., None]), 0, 15)
    return (q - 8).to(torch.int8).reshape(out, k), d, lo + 8 * d


@torch.no_grad()
def to_group_offset(lin: nn.Linear, group: int = GROUP_SIZE) -> GroupOffsetLinear:
    """``lin`` quantized to asymmetric 4-bit groups, as a :class:`GroupOffsetLinear` of torchao weights."""
    k, n = lin.in_features, lin.out_features
    q, d, c = asymmetric_4bit(lin.weight, group)
    main = nn.Linear(k, n, bias=lin.bias is not None)
    if lin.bias is not None:
        main.bias.copy_(lin.bias)
    main.weight = nn.Parameter(_int_weight(q, d, 4, group), requires_grad=False)
    groups = k // group
    group_sum = nn.Linear(k, groups, bias=False)
    offset = nn.Linear(groups, n, bias=False)
    ones = torch.eye(groups, dtype=torch.int8).repeat_interleave(group, dim=1)
    if groups == 1:  # one group: [1, k] and [n, 1] fp32 (torchao's per-token quantization needs width > 1)
        group_sum.weight.copy_(ones.float())
        offset.weight.copy_(c)
    else:
        group_sum.weight = nn.Parameter(_int_weight(ones, torch.ones(groups, 1), 8, k), requires_grad=False)
        scale = (c.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
        offset.weight = nn.Parameter(_int_weight(torch.round(c / scale).to(torch.int8), scale, 8, groups),
                                     requires_grad=False)
    return GroupOffsetLinear(main, group_sum, offset)


# ---------------------------------------------------------------------------------------------- the recipe
def linear_schemes(decoder: nn.Module, recipe: Recipe) -> dict[str, str]:
    """The scheme each Linear of ``decoder`` gets under ``recipe``: ``8da4w-g32`` or ``8da8w-per-channel``."""
    out = {}
    for name, mod in decoder.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        four = recipe.lm_head == "4bit" if name.endswith("lm_head") else \
            not any(name.endswith(k) for k in recipe.keep_8bit)
        out[name] = "8da4w-g32" if four and mod.in_features % GROUP_SIZE == 0 else "8da8w-per-channel"
    return out


@torch.no_grad()
def quantize_decoder(decoder: nn.Module, recipe: Recipe = DEFAULT_RECIPE) -> dict:
    """Quantize ``decoder``'s Linears and token embedding in place, as ``recipe`` says.

    Returns what was done, for the manifest: the recipe, the scheme of every Linear (counted), the 8-bit
    fallbacks and the embedding's and the LM head's precision.
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    recipe.check()
    schemes = linear_schemes(decoder, recipe)
    # a tied head and embedding part here: each is given a new weight of its own (the two kernels differ)
    emb = getattr(decoder, "embed_tokens", None)
    four = {fqn for fqn, sch in schemes.items() if sch == "8da4w-g32"}
    eight = {fqn for fqn, sch in schemes.items() if sch != "8da4w-g32"}
    if recipe.qparams == "asymmetric":
        modules = dict(decoder.named_modules())
        for fqn in four:
            parent, _, attr = fqn.rpartition(".")
            setattr(modules[parent] if parent else decoder, attr, to_group_offset(modules[fqn]))
    else:
        quantize_(decoder, Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE), intx_choose_qparams_algorithm=recipe.qparams),
            filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in four)
    quantize_(decoder, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in eight)
    embedding = "float32"
    if recipe.embedding != "none" and isinstance(emb, nn.Embedding):
        if recipe.embedding == "4bit" and emb.embedding_dim % GROUP_SIZE == 0:
            asym = recipe.qparams == "asymmetric"
            cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP_SIZE),
                                       mapping_type=MappingType.ASYMMETRIC if asym else MappingType.SYMMETRIC,
                                       intx_choose_qparams_algorithm="affine" if asym else recipe.qparams)
            embedding = f"int4-g{GROUP_SIZE}" + ("-asymmetric" if asym else "")
        else:
            cfg = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
            embedding = "int8-per-row"
        quantize_(decoder, cfg, filter_fn=lambda m, fqn: m is emb)
    counts: dict[str, int] = {}
    for s in schemes.values():
        counts[s] = counts.get(s, 0) + 1
    return {"scheme": "8da4w", "recipe": asdict(recipe), "group_size": GROUP_SIZE, "linear_counts": counts,
            "lm_head": schemes.get("lm_head", "none"), "embedding": embedding,
            "fallback_8bit": sorted(k for k, v in schemes.items() if v != "8da4w-g32" and not k.endswith("lm_head"))}
