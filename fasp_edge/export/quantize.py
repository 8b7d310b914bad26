"""Weight quantization of the 4-bit ExecuTorch artifact (``--quant 8da4w``), chosen by measured quality.

What the XNNPACK artifact computes: a Linear takes 8-bit dynamic per-token activations and 4-bit weights
in groups of 32 with one bf16 scale per group and NO zero point (XNNPACK's ``qd8-f32-qb4w``: the grid of a
group is ``d·{-8..7}``); a Linear whose input width is not a multiple of 32 takes 8-bit per-channel
weights. Every quantized Linear is a :class:`DynamicQuantLinear`, written in the ``quantized_decomposed`` ops
XNNPACK lowers. The token embedding is not an XNNPACK op: :class:`QuantizedEmbedding` calls ExecuTorch's
``quantized_decomposed::embedding_byte`` / ``embedding_4bit`` kernel, which does take zero points. A tied
table (SmolLM2's) is 8-bit: the embedding kernel reads the 8-bit LM head's own integers, and the bundle's
``model.ptd`` stores them once, so the quantized embedding costs no bytes (dense SmolLM2: 113 MB of fp32
table gone).

Where the 1.6x perplexity of a plain torchao export came from (SmolLM2-135M-Instruct, WikiText-2 test;
``benchmarks/quant_quality.py`` measures each part alone): the 4-bit weights. SmolLM2 is published as
GGUF Q4_1, so its fp32 weights already lie on an asymmetric 4-bit grid ``m + d·{0..15}`` per group of 32;
re-quantizing them on a symmetric grid adds a second, full 4-bit error. 8-bit dynamic activations cost
~2.5%, the 4-bit LM head a few percent more.

Two recipes answer it:

* The default, ``gptq`` (:func:`calibrated_4bit`): symmetric groups, one plain XNNPACK 4-bit Linear per Linear,
  calibrated on a few thousand tokens: activation-aware smoothing folded into the norms and producer Linears,
  then GPTQ, block after block; ``down_proj``, ``v_proj`` and ``k_proj`` keep 8-bit per-channel weights (the
  Linear kinds whose 4-bit rounding cost the most, chosen on WikiText-2 validation windows apart from the
  calibration ones; 3 MB more than ``down_proj`` alone for dense SmolLM2), the LM head 8-bit.
* ``asymmetric`` (:class:`GroupOffsetLinear`): min/max 4-bit weights on XNNPACK's symmetric kernel,
  ``W = d·(q - 8) + c`` per group, computed as ``main(x) + offset(group_sum(x))``. It reproduces a GGUF
  Q4_1/Q4_K weight up to the bf16 rounding of its scales, and for any other weight it is min/max 4-bit
  quantization, half a bit finer than symmetric. Cost: two small fp32 Linears per 4-bit Linear (``in/32``
  wide; 4 bytes per group beside the group's 18), all inside the XNNPACK delegate, and one group sum per
  input: q/k/v (and gate/up) share theirs (:class:`GroupSum`); those extra operators make its decode slower.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidArgument
from ..pipeline.stats import InputStatistics

GROUP_SIZE = 32
QPARAMS = ("asymmetric", "gptq", "hqq_scale_only", "affine")
HEAD_PRECISIONS = ("8bit", "4bit")
EMBEDDING_PRECISIONS = ("none", "4bit", "8bit")


#: the Linears (name suffixes) each weight grid keeps at 8-bit per-channel weights when ``--keep-8bit`` is not
#: given: the calibrated symmetric grid keeps the three whose 4-bit rounding costs the most
KEEP_8BIT = {"gptq": ["down_proj", "v_proj", "k_proj"]}


@dataclass
class Recipe:
    """How ``--quant 8da4w`` quantizes a model (recorded in the manifest); ``Recipe()`` is the default.

    ``qparams``: ``gptq`` (symmetric groups, calibrated: smoothing folded into the weights, then GPTQ, block after
    block; :func:`calibrated_4bit`), ``asymmetric`` (min/max groups through :class:`GroupOffsetLinear`), or
    torchao's symmetric ``hqq_scale_only`` / ``affine``. ``lm_head`` / ``embedding``: the precision of those two
    tables (a tied 8-bit embedding reads the 8-bit head's integers). ``keep_8bit``: Linear names (suffixes) kept
    at 8-bit per-channel weights; ``None`` takes the grid's own list (:data:`KEEP_8BIT`).
    """

    qparams: str = "gptq"
    lm_head: str = "8bit"
    # 8-bit rows: a tied table takes the 8-bit head's integers, stored once in model.ptd (no extra bytes)
    embedding: str = "8bit"
    keep_8bit: list[str] | None = None

    def __post_init__(self):
        if self.keep_8bit is None:
            self.keep_8bit = list(KEEP_8BIT.get(self.qparams, []))

    @property
    def calibrated(self) -> bool:
        """Whether quantizing with this recipe needs calibration windows."""
        return self.qparams == "gptq"

    def check(self) -> None:
        for what, value, allowed in (("qparams", self.qparams, QPARAMS), ("LM head precision", self.lm_head,
                                      HEAD_PRECISIONS), ("embedding precision", self.embedding, EMBEDDING_PRECISIONS)):
            if value not in allowed:
                raise InvalidArgument(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")


#: the default: the calibrated symmetric grid, chosen by measurement (see the module docstring)
DEFAULT_RECIPE = Recipe()
CALIBRATED_RECIPE = DEFAULT_RECIPE
#: min/max groups (``--qparams asymmetric``): the closest to a GGUF-Q4-sourced model's own weights, one offset
#: Linear and one group sum per 4-bit Linear on top (a slower decode)
ASYMMETRIC_RECIPE = Recipe(qparams="asymmetric")


# ---------------------------------------------------------------------------------------------- linears
class DynamicQuantLinear(nn.Module):
    """A Linear with 8-bit dynamic per-token activations and integer weights, written in the
    ``quantized_decomposed`` ops that XNNPACK lowers to ``qd8-f32-qb4w`` (4-bit, groups) / ``qd8-f32-qc8w``
    (8-bit, per output channel).

    ``weight_int``: int8 ``[out, in]`` holding ``-8..7`` (4-bit) or ``-127..127`` (8-bit); ``scales``:
    ``[out, in/group]`` (4-bit) or ``[out]`` (8-bit); the weight is ``scales·weight_int`` (no zero point: the
    kernels' grids are symmetric). Eagerly it computes the same with the ops' reference implementations.

    Why not torchao's quantized tensor subclass: its ops are traced op by op under fake tensors in every
    lowering pass (SmolLM2's 8da4w export spent ~1000 s lowering); these ops carry cheap meta kernels.
    """

    def __init__(self, weight_int: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

        self.bits, self.group = bits, group
        self.out_features, self.in_features = weight_int.shape
        self.register_buffer("weight_int", weight_int.to(torch.int8))
        self.register_buffer("scales", scales.float())
        # XNNPACK wants zero points beside the scales (all zero: symmetric grids)
        self.register_buffer("zero_points", torch.zeros(scales.shape, dtype=torch.int64 if bits == 8 else torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    @torch.no_grad()
    def int8_per_channel(cls, lin: nn.Linear) -> "DynamicQuantLinear":
        """``lin`` with symmetric 8-bit weights per output channel (``s = max|row| / 127``)."""
        return cls(*_int8_rows(lin.weight), 8, lin.in_features, lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        s, z = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
        x = qd.dequantize_per_token(qd.quantize_per_token(x, s, z, -128, 127, torch.int8), s, z, -128, 127,
                                    torch.int8, torch.float32)
        eager = not torch.compiler.is_exporting()
        w = self.__dict__.get("_eager_weight") if eager else None
        if w is None:
            if self.bits == 4:
                w = qd.dequantize_per_channel_group(self.weight_int, self.scales, self.zero_points, -8, 7, torch.int8,
                                                    self.group, torch.float32)
            else:
                w = qd.dequantize_per_channel(self.weight_int, self.scales, self.zero_points, 0, -128, 127, torch.int8)
            if eager:
                self.__dict__["_eager_weight"] = w  # run eagerly again and again by calibration: dequantized once
        return F.linear(x, w, self.bias)

    def drop_eager_weight(self) -> None:
        """Free the fp32 copy of the weight that eager calls keep (export traces the integer form)."""
        self.__dict__.pop("_eager_weight", None)


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit rows of ``w [out, in]``: int8 ``q`` and ``s [out]`` with ``w ≈ s·q``, ``s = max|row| / 127``."""
    w = w.detach().float()
    s = (w.abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s


class GroupSum(nn.Module):
    """The sums of each group of ``group`` input channels: ``x [.., in] -> [.., in/group]``, an fp32 Linear with a
    constant 0/1 weight (exact, no activation quantization).

    Sibling Linears that read one input (q/k/v, gate/up) share one ``GroupSum``: called again with the same
    tensor object it returns its last result, so the exported graph computes the sums once per input (one
    node, not three). It only ever skips work for the very tensor it has seen (it keeps a reference to it,
    so that object cannot be freed and its identity reused): sharing is always exact.
    """

    def __init__(self, in_features: int, group: int = GROUP_SIZE):
        super().__init__()
        self.register_buffer("weight", torch.eye(in_features // group).repeat_interleave(group, dim=1))
        self._last = _LastCall()  # a plain holder, not module state: export must not see it as a tensor attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last
        if last.x is not x:
            last.x, last.sums = x, F.linear(x, self.weight)
        return last.sums


class _LastCall:
    __slots__ = ("x", "sums")

    def __init__(self):
        self.x = self.sums = None

    def __deepcopy__(self, memo):  # a copied module starts with nothing remembered
        return _LastCall()


class GroupOffsetLinear(nn.Module):
    """An asymmetric 4-bit Linear on XNNPACK's symmetric 4-bit kernel: ``main(x) + offset(group_sum(x))``.

    A group's asymmetric grid ``m + d·{0..15}`` is ``d·(q - 8) + c`` with ``c = m + 8d``: ``main`` holds
    ``d·(q - 8)`` (4-bit, symmetric, 8-bit dynamic activations), :class:`GroupSum` sums each group of 32 input
    channels of the fp32 input and ``offset`` (an fp32 Linear ``[out, in/32]``) adds ``c`` times those sums.
    Build it with :func:`to_group_offset`.

    Why fp32 for the two small Linears: a dynamically quantized Linear is two XNNPACK operators (activation
    conversion and the integer FC) and ~5 graph nodes; its fp32 counterpart is one, and every lowering pass
    re-traces every node. SmolLM2-135M, dense, 2 cores, alone (``export_pte``'s ``lowering_seconds``): 8-bit
    group sums and offsets lowered in 473 s to 5504 delegated nodes; fp32 ones with shared group sums in 253 s,
    2894 nodes (cut to 10 layers: 122 s / 1844 nodes, fp32 94 s / 1004, shared 76 s / 974). Decode speed was the
    same within noise (two A/B runs of 64 steps, 2 threads: 92 vs 95 and 86 vs 81 tok/s). The model files grow
    by 4 bytes per group (93.3 -> 102.7 MB dense); the fp32 path is exact where the 8-bit one rounded the sums
    and the offsets (WikiText-2 validation, 4 x 512 through the artifact: 1.012x the fp32 model's perplexity).
    """

    def __init__(self, main: nn.Module, group_sum: GroupSum, offset: nn.Module):
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
    """``lin`` quantized to asymmetric 4-bit groups, as a :class:`GroupOffsetLinear` (its own :class:`GroupSum`)."""
    q, d, c = asymmetric_4bit(lin.weight, group)
    offset = nn.Linear(lin.in_features // group, lin.out_features, bias=False)
    offset.weight.copy_(c)
    return GroupOffsetLinear(DynamicQuantLinear(q, d, 4, group, lin.bias), GroupSum(lin.in_features, group), offset)


#: Linears that read one input tensor in the export decoders (attention's projections, the gated MLP's two)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def share_group_sums(decoder: nn.Module) -> None:
    """Let the :class:`GroupOffsetLinear` siblings of :data:`SIBLINGS` share one :class:`GroupSum`."""
    for mod in decoder.modules():
        kids = dict(mod.named_children())
        for names in SIBLINGS:
            group = [kids[n] for n in names if isinstance(kids.get(n), GroupOffsetLinear)]
            if len(group) > 1 and len({g.main.in_features for g in group}) == 1:
                for g in group[1:]:
                    g.group_sum = group[0].group_sum


# ---------------------------------------------------------------------------------------------- calibrated
#: the factors of ``max|group| / 8`` a symmetric group's scale is searched over (the smallest weighted error wins)
SCALE_FACTORS = torch.linspace(0.6, 1.15, 23)
#: the exponents ``a`` of the smoothing scales ``s = rms(x)^a`` searched per pair (0 = no smoothing)
#: (11 exponents, 9 scale factors or every k-th of 512 output rows in the search: 1.094-1.122x the fp32 perplexity
#: against 1.082x, dense SmolLM2, eager, WikiText-2 test 4 x 512, for 35-60% of the quantizer's 94 s)
SMOOTHING_EXPONENTS = torch.linspace(0.0, 1.0, 21)
#: the search stops after this many exponents in a row that do not beat the best so far: on SmolLM2-135M dense and
#: FASP-0.3 every one of the 90 pairs gets the full search's exponent, for 2.3x / 2.1x fewer error evaluations
#: (patience 3: 1 / 4 pairs differ); the optima lie low (mean exponent 0.16 / 0.21)
SMOOTHING_PATIENCE = 5
_SEARCH_BLOCK = 1 << 17  # elements (groups x group size x factors) searched at once by searched_scales
GPTQ_DAMP = 0.01  # ridge added to a Gram matrix before GPTQ inverts it, relative to its mean diagonal


def _bf16(d: torch.Tensor) -> torch.Tensor:
    return d.clamp(min=1e-10).to(torch.bfloat16).float()


def _on_grid(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Groups ``g [.., group]`` rounded onto ``d·{-8..7}`` (``d [..]``), dequantized."""
    return torch.clamp(torch.round(g / d[..., None]), -8, 7) * d[..., None]


def searched_scales(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The bf16 scale of each symmetric 4-bit group ``g [out, n, group]`` minimising the rounding error weighted
    by ``weight [n, group]`` (the input channels' mean squares: errors on large inputs cost more); the first of
    :data:`SCALE_FACTORS` wins a tie.

    Every factor is tried on a block of rows at once, blocks small enough to stay in a core's cache: 4.5x faster
    than one pass over the whole weight per factor (3072 x 576, one thread: 0.18 s against 0.80 s), the same
    scales to the bit."""
    base = g.abs().amax(-1) / 8
    out = torch.empty_like(base)
    factors = SCALE_FACTORS.view(-1, 1, 1)
    rows = max(1, _SEARCH_BLOCK // (g.shape[1] * g.shape[2] * factors.shape[0]))
    for r0 in range(0, g.shape[0], rows):
        gb = g[r0:r0 + rows]
        d = _bf16(base[r0:r0 + rows][None] * factors)  # [factors, rows, n]
        err = ((_on_grid(gb, d) - gb) ** 2 * weight).sum(-1)
        out[r0:r0 + rows] = d.gather(0, err.argmin(0)[None])[0]
    return out


def _gptq_inverse(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What GPTQ rounds with, from the input's ``XᵀX`` (``gram [n, n]``, zero-padded to ``k`` inputs): the upper
    Cholesky factor of the damped inverse (fp32), the damped diagonal, and the dead inputs (zero diagonal: never
    seen, or padding), whose weights the caller zeroes."""
    h = torch.zeros(k, k, dtype=torch.float64)
    n = gram.shape[0]
    h[:n, :n] = gram.detach().double()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    h += GPTQ_DAMP * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    return hinv, torch.diag(h).float(), dead


def gptq_4bit(w: torch.Tensor, gram: torch.Tensor, group: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit groups of ``w [out, in]`` with GPTQ's error compensation (Frantar et al., 2023).

    Columns are rounded in order; each one's rounding error is spread over the columns not yet rounded
    through the inverse of ``gram`` (the input's ``XᵀX``), so the Linear's output on the calibration inputs
    moves as little as it can. Each group's scale is searched (:func:`searched_scales`) on the weights as the
    earlier groups' errors left them. Returns ``(q in -8..7 as int8, d [out, in/group], bf16-exact)``.
    """
    w = w.detach().float().clone()
    out, k = w.shape
    hinv, diag, dead = _gptq_inverse(gram, k)
    w[:, dead] = 0.0
    q = torch.empty(out, k, dtype=torch.int8)
    scales = torch.empty(out, k // group)
    for gi, i0 in enumerate(range(0, k, group)):
        blk = w[:, i0:i0 + group]
        d = searched_scales(blk[:, None], diag[i0:i0 + group][None])[:, 0]
        scales[:, gi] = d
        hb = hinv[i0:i0 + group, i0:i0 + group]
        err = torch.empty_like(blk)
        for j in range(group):
            qi = torch.clamp(torch.round(blk[:, j] / d), -8, 7)
            q[:, i0 + j] = qi.to(torch.int8)
            e = (blk[:, j] - qi * d) / hb[j, j]
            blk[:, j:] -= e[:, None] * hb[j, j:][None]
            err[:, j] = e
        w[:, i0 + group:] -= err @ hinv[i0:i0 + group, i0 + group:]
    return q, scales


class _AllInputsSeen(Exception):
    """Raised inside a calibration pass once every Linear asked for has had its input recorded."""


def _siblings(name: str) -> list[str]:
    """The other Linears of :data:`SIBLINGS` beside ``name`` (same parent module): they read its input tensor."""
    parent, _, leaf = name.rpartition(".")
    group = next((g for g in SIBLINGS if leaf in g), ())
    return [f"{parent}.{n}" if parent else n for n in group if n != leaf]


@torch.no_grad()
def input_grams(run, inputs, linears: dict[str, nn.Linear], progress: bool = False,
                desc: str = "calibration statistics") -> dict[str, torch.Tensor]:
    """``XᵀX`` (float64, :class:`~fasp_edge.pipeline.stats.InputStatistics`) of the input of each Linear in
    ``linears`` while ``run(x)`` is called on each ``x`` of ``inputs`` (e.g. a block of an
    :class:`~fasp_edge.models.decoder.ExportDecoder` on its input hidden states). Linears that read one tensor (the
    :data:`SIBLINGS`: q/k/v, gate/up) get the same matrix object. Each call of ``run`` stops as soon as every
    Linear's input is recorded: a block's statistics for q/o/gate/up skip its three MLP products."""
    from tqdm.auto import tqdm


    stats: dict[str, InputStatistics] = {}
    alias: dict[str, str] = {}
    wanted = set(linears)
    read: dict[str, torch.Tensor] = {}  # this call's input of each Linear recorded (or aliased)

    def hook(name):
        def fn(mod, args):
            x = args[0]
            if name in read:  # a sibling that was recorded through another: it must read the same tensor
                if read[name] is not x:
                    raise RuntimeError(f"{name} does not read its siblings' input; calibration cannot share it")
                return
            stats.setdefault(name, InputStatistics(x.shape[-1])).update(x)
            read[name] = x
            for sib in _siblings(name):
                if sib in wanted:
                    alias.setdefault(sib, name)
                    read[sib] = x
            if wanted <= read.keys():
                raise _AllInputsSeen
        return fn

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for x in tqdm(inputs, desc=desc, disable=not progress, leave=False):
            read.clear()
            try:
                run(x)
            except _AllInputsSeen:
                pass
    finally:
        for h in hooks:
            h.remove()
        read.clear()
    grams = {name: st.gram for name, st in stats.items()}
    return {**grams, **{name: grams[owner] for name, owner in alias.items() if owner in grams}}


@dataclass
class _Pair:
    """Input channels of ``consumers`` that can be scaled by ``1/s`` at no runtime cost, ``s`` folded into what
    produces them: a norm's weight (and bias) or a producer Linear's output rows. ``tie``: query heads per
    key/value head when the producer is ``v_proj`` and the consumer ``o_proj`` (heads sharing a value head
    share its scales)."""

    consumers: list
    norm: nn.Module | None = None
    producer: nn.Linear | None = None
    tie: tuple[int, int, int] | None = None  # (query heads, kv heads, value dims per head)


def smoothing_pairs(decoder: nn.Module) -> list[_Pair]:
    """Every scalable input of the decoder's Linears: what each family's block declares
    (``block.smoothing_pairs()``: a norm or a producer Linear and the Linears it feeds), plus each attention's
    ``v_proj`` -> ``o_proj`` (heads sharing a value head share its scales)."""
    pairs = []
    for blk in decoder.blocks:
        at = blk.attn
        pairs += [_Pair(**p) for p in blk.smoothing_pairs()]
        dv = at.v_proj.out_features // at.num_kv_heads
        if at.o_proj.in_features == at.num_heads * dv:
            pairs.append(_Pair([at.o_proj], producer=at.v_proj, tie=(at.num_heads, at.num_kv_heads, dv)))
    return pairs


def _smoothed_error(ws: torch.Tensor, gram: torch.Tensor, s: torch.Tensor, grid=None) -> float:
    """``tr(D·H·Dᵀ)``: the squared output error over the calibration inputs of rounding ``ws·diag(s)`` to
    symmetric 4-bit groups (or ``grid(groups, weight) -> rounded groups``, ``weight`` the scaled inputs' mean squares
    per group) and undoing ``s`` (``D = Q(ws·s)/s - ws``)."""
    g = (ws * s[None]).reshape(ws.shape[0], -1, GROUP_SIZE)
    weight = (torch.diag(gram) / s**2).reshape(-1, GROUP_SIZE)
    rounded = _on_grid(g, searched_scales(g, weight)) if grid is None else grid(g, weight)
    diff = rounded.reshape_as(ws) / s[None] - ws
    return float(((diff @ gram) * diff).sum())


@torch.no_grad()
def smooth(pairs: list[_Pair], grams: dict[int, torch.Tensor], grid=None) -> list[float]:
    """Activation-aware smoothing (after AWQ, Lin et al., 2024), folded into the weights: for each
    pair (:func:`smoothing_pairs`), input channel ``j`` of the consumers is scaled by ``s_j = rms(x_j)^a``
    (normalised), their weights' columns by ``s`` and the producer by ``1/s``, with the exponent ``a`` that
    minimises the consumers' 4-bit output error (:func:`_smoothed_error` on ``grid``, default XNNPACK's
    symmetric groups with searched scales; ``a = 0`` is no change). The fp32
    model computes the same function. Only the consumers with a Gram matrix in ``grams`` (keyed by
    ``id(linear)``; those to be rounded to 4 bits) count in the error; a consumer kept at 8 bits (e.g. ``v_proj``
    beside a 4-bit ``q_proj`` and ``k_proj``) is scaled with them, still in fp32. ``grams`` is updated in place to
    the smoothed inputs. Returns the chosen exponents."""
    chosen = []
    for pair in pairs:
        lins = pair.consumers
        fitted = [lin for lin in lins if id(lin) in grams]
        movable = all(isinstance(m, nn.Linear) for m in lins + ([pair.producer] if pair.producer is not None else []))
        if not fitted or not movable or lins[0].in_features % GROUP_SIZE:
            continue
        gram = grams[id(fitted[0])].float()
        rms = torch.diag(gram).clamp(min=1e-12).sqrt()
        ws = torch.cat([lin.weight.float() for lin in fitted])
        best = (_smoothed_error(ws, gram, torch.ones_like(rms), grid), 0.0, None)
        worse = 0
        for a in SMOOTHING_EXPONENTS[1:]:
            if worse >= SMOOTHING_PATIENCE:
                break
            s = rms ** float(a)
            if pair.tie is not None:  # one scale per (value head, dim), the geometric mean over its query heads
                h, kv, dv = pair.tie
                s = s.log().reshape(kv, h // kv, dv).mean(1, keepdim=True).exp().expand(kv, h // kv, dv).reshape(-1)
            s = s / (s.max() * s.min()).sqrt()
            err = _smoothed_error(ws, gram, s, grid)
            if err < best[0]:
                best, worse = (err, float(a), s), 0
            else:
                worse += 1
        chosen.append(best[1])
        s = best[2]
        if s is None:
            continue
        for lin in lins:
            lin.weight.mul_(s[None])
        if pair.norm is not None:
            pair.norm.weight.div_(s)
            if getattr(pair.norm, "bias", None) is not None:
                pair.norm.bias.div_(s)
        else:
            rows = s if pair.tie is None else s.reshape(pair.tie[1], -1, pair.tie[2])[:, 0].reshape(-1)
            pair.producer.weight.div_(rows[:, None])
            if pair.producer.bias is not None:
                pair.producer.bias.div_(rows)
        scaled = grams[id(fitted[0])] / (s[:, None] * s[None, :]).double()
        for lin in fitted:
            grams[id(lin)] = scaled
    return chosen


@torch.no_grad()
def calibrated_4bit(decoder: nn.Module, fqns: set[str], windows: torch.Tensor, progress: bool = False,
                    eight: set[str] = frozenset(), make_four=None, make_eight=None, smoothing_grid=None,
                    after_block=None) -> dict:
    """Quantize the Linears ``fqns`` of ``decoder`` (an :class:`~fasp_edge.models.decoder.ExportDecoder`, static cache) to
    symmetric 4-bit groups by calibration on ``windows [n, T]``: smoothing (:func:`smooth`) then GPTQ
    (:func:`gptq_4bit`) on the Gram matrices of their inputs. The Linears ``eight`` of a block (8-bit
    per-channel weights) are smoothed with it and quantized right after its 4-bit ones, so later blocks are
    calibrated on what they will see; quantize 8-bit Linears outside the blocks (the LM head) and the token
    embedding before calling this.

    Block after block, as GPTQ quantizes a model: the windows' hidden states are carried through the blocks
    already quantized, so each block's statistics are those of the inputs it will see in the artifact and its
    compensation takes up what the blocks before it lost. Within a block the statistics come from its fp32
    form. Linears outside the blocks (a 4-bit LM head) are calibrated on the last block's outputs at every
    position. Returns what the manifest records of it.

    ``make_four(linear, gram)`` / ``make_eight(linear)`` build the quantized modules (default: XNNPACK's symmetric
    :class:`DynamicQuantLinear` through :func:`gptq_4bit`, and its 8-bit per-channel form); the ONNX artifact passes
    ONNX Runtime's blockwise grids (:func:`quantize_blockwise`), and ``smoothing_grid`` the grid its smoothing search
    rounds to (:func:`smooth`). ``after_block()`` is called once each block is quantized and passed (an export
    in place frees the fp32 weights the block's quantized modules replaced, :func:`~fasp_edge.export.bundle`).
    A passed block's quantized modules drop their eager fp32 weights at once: nothing runs them again here, so
    the calibration never holds a second fp32 model (a 1.5B model's 7 GB).

    Block after block is what GPTQ's authors do; here it moved dense SmolLM2 (eager, ``down_proj`` 8-bit, 32 x 256
    tokens of WikiText-2 validation) from 1.0878x to 1.0857x the fp32 perplexity on WikiText-2 test 4 x 512, a
    small gain; the 8-bit ``v_proj`` / ``k_proj`` of the default recipe did more (``benchmarks/quant_quality.py``).
    """
    from tqdm.auto import tqdm

    modules = dict(decoder.named_modules())
    lins = {fqn: modules[fqn] for fqn in fqns}
    pairs = smoothing_pairs(decoder)
    exponents: list[float] = []

    make_four = make_four or (lambda lin, gram: DynamicQuantLinear(*gptq_4bit(lin.weight, gram), 4, GROUP_SIZE,
                                                                     lin.bias))
    make_eight = make_eight or DynamicQuantLinear.int8_per_channel

    def quantize(names, grams):
        _replace(decoder, set(names), lambda lin: make_four(lin, grams[id(lin)]))

    def calibrate(run, inputs, group, smoothing=()):
        named = input_grams(run, inputs, group)
        grams = {id(group[n]): g for n, g in named.items()}
        exponents.extend(smooth(list(smoothing), grams, smoothing_grid))
        quantize(named, grams)

    in_blocks = _block_module_ids(decoder)
    outside = {f: lin for f, lin in lins.items() if id(lin) not in in_blocks}
    decoder.reset_cache()
    try:
        if outside:  # before the blocks: OPT's project_in
            calibrate(decoder.embed_window, (w[None] for w in windows), outside)
        hidden = [decoder.embed_window(w[None]) for w in windows]
        now = dict(decoder.named_modules())
        rest = {f: now[f] for f in outside if isinstance(now[f], nn.Linear)}  # not quantized before the blocks
        last = len(decoder.blocks) - 1
        for i, block in enumerate(tqdm(decoder.blocks, desc="calibrated 4-bit", disable=not progress, leave=False)):
            inside = {id(m) for m in block.modules()}
            calibrate(lambda x, i=i: decoder.run_block(i, x), hidden,
                      {f: lin for f, lin in lins.items() if id(lin) in inside},
                      [p for p in pairs if id(p.consumers[0]) in inside])
            _replace(decoder, {f for f in eight if id(modules[f]) in inside}, make_eight)
            if i < last or rest:
                hidden = [decoder.run_block(i, x) for x in hidden]
            for m in block.modules():
                if isinstance(m, (DynamicQuantLinear, BlockQuantLinear)):
                    m.drop_eager_weight()
            if after_block is not None:
                after_block()
        if rest:  # after the blocks: OPT's project_out, a 4-bit LM head
            calibrate(decoder.head_logits, hidden, rest)
    finally:
        decoder.reset_cache()
        for m in decoder.modules():
            if isinstance(m, (DynamicQuantLinear, BlockQuantLinear)):
                m.drop_eager_weight()
    return {"windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "order": "block by block",
            "smoothed_pairs": sum(a > 0 for a in exponents), "pairs": len(exponents),
            "mean_smoothing_exponent": round(sum(exponents) / max(len(exponents), 1), 3)}


# ---------------------------------------------------------------------------------------------- embedding
class QuantizedEmbedding(nn.Module):
    """A token embedding kept as integers, run by ExecuTorch's ``quantized_decomposed::embedding_byte`` /
    ``embedding_4bit`` kernels (the graph calls the kernel's op itself; no quant fusion pass is involved).

    ``weight``: int8 ``[V, D]`` (8-bit) or nibble-packed uint8 ``[V, D/2]`` (4-bit, high nibble first, stored
    ``q + 8``); ``scales``: ``[V]`` per row or ``[V, D/group]``; ``zero_points``: ``None`` or like ``scales``
    (``w = scale·(q - zero_point)``). Eagerly only the looked-up rows are dequantized.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.float())
        self.register_buffer("zero_points", None if zero_points is None else zero_points.float())
        self.embedding_dim = weight.shape[1] * (2 if bits == 4 else 1)

    @classmethod
    @torch.no_grad()
    def int8_per_row(cls, w: torch.Tensor) -> "QuantizedEmbedding":
        """Symmetric 8-bit rows (:func:`_int8_rows`)."""
        q, s = _int8_rows(w)
        return cls(q, s, None, 8)

    @classmethod
    @torch.no_grad()
    def asymmetric_4bit(cls, w: torch.Tensor, group: int = GROUP_SIZE) -> "QuantizedEmbedding":
        """Min/max 4-bit groups along ``D`` (:func:`asymmetric_4bit`): ``w = d·(q - z)`` with ``z = -c/d``."""
        q, d, c = asymmetric_4bit(w, group)
        u = (q.to(torch.int16) + 8).to(torch.uint8)
        packed = (u[:, 0::2] << 4) | u[:, 1::2]
        return cls(packed, d, -c / d, 4)

    def _dequantized_rows(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.weight[idx]
        if self.bits == 4:
            w = torch.stack((w >> 4, w & 15), dim=-1).flatten(-2).to(torch.int16) - 8
        w = w.float()
        scales = self.scales[idx]
        if scales.dim() == idx.dim():  # per row
            return w * scales.unsqueeze(-1)
        zp = self.zero_points[idx] if self.zero_points is not None else 0.0
        groups = scales.shape[-1]
        w = w.unflatten(-1, (groups, -1))
        return ((w - torch.as_tensor(zp).unsqueeze(-1)) * scales.unsqueeze(-1)).flatten(-2)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            return self._dequantized_rows(indices)
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (registers the ops)

        if self.bits == 8:
            return torch.ops.quantized_decomposed.embedding_byte.default(
                self.weight, self.scales, self.zero_points, -128, 127, indices)
        return torch.ops.quantized_decomposed.embedding_4bit.default(
            self.weight, self.scales, self.zero_points, -8, 7, indices)


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


def _quantize_embedding(decoder: nn.Module, recipe: Recipe, emb: nn.Module | None, tied_source: bool) -> str:
    """Put the token embedding ``emb`` at ``recipe.embedding``'s precision (after the LM head is quantized: a tied
    8-bit table reads the 8-bit head's integers); returns what the manifest says of it."""
    if recipe.embedding == "none" or not isinstance(emb, nn.Embedding):
        return "float32"
    head = getattr(decoder, "lm_head", None)
    if recipe.embedding == "8bit" and tied_source and isinstance(head, DynamicQuantLinear) and head.bits == 8:
        # the 8-bit head's own integer tensor (the same object: export sees one constant, which model.ptd
        # stores once for the embedding kernel and the XNNPACK head)
        decoder.embed_tokens = QuantizedEmbedding(head.weight_int, head.scales, None, 8)
        return "int8-per-row, shared with the LM head"
    if recipe.embedding == "4bit" and emb.embedding_dim % GROUP_SIZE == 0:
        decoder.embed_tokens = QuantizedEmbedding.asymmetric_4bit(emb.weight)
        return f"int4-g{GROUP_SIZE}-asymmetric"
    decoder.embed_tokens = QuantizedEmbedding.int8_per_row(emb.weight)
    return "int8-per-row"


def _block_module_ids(decoder: nn.Module) -> set[int]:
    """``id`` of every module inside ``decoder``'s blocks (what block-by-block calibration quantizes in turn)."""
    return {id(m) for b in decoder.blocks for m in b.modules()}


def _replace(decoder: nn.Module, fqns: set[str], make) -> None:
    """Put ``make(module)`` in place of each submodule of ``decoder`` named in ``fqns``."""
    modules = dict(decoder.named_modules())
    for fqn in fqns:
        parent, _, attr = fqn.rpartition(".")
        setattr(modules[parent] if parent else decoder, attr, make(modules[fqn]))


@torch.no_grad()
def quantize_decoder(decoder: nn.Module, recipe: Recipe = DEFAULT_RECIPE, calibration: torch.Tensor | None = None,
                     progress: bool = False, after_block=None) -> dict:
    """Quantize ``decoder``'s Linears and token embedding in place, as ``recipe`` says. The calibrated grid's
    smoothing rescales the norms and Linears the decoder shares with its source model (the same fp32 function):
    give it a decoder over a copy of a model that is used afterwards for anything but this export.

    ``calibration``: token windows ``[n, T]`` (``qparams="gptq"`` needs them; the others ignore them).
    ``after_block``: :func:`calibrated_4bit`'s, called after each calibrated block.
    Returns what was done, for the manifest: the recipe, the scheme of every Linear (counted), the 8-bit
    fallbacks and the embedding's and the LM head's precision.
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    recipe.check()
    schemes = linear_schemes(decoder, recipe)
    emb = getattr(decoder, "embed_tokens", None)
    # read before the head is replaced: a tied table may then take the 8-bit head's integers
    tied_source = isinstance(emb, nn.Embedding) and getattr(getattr(decoder, "lm_head", None), "weight", None) is emb.weight
    four = {fqn for fqn, sch in schemes.items() if sch == "8da4w-g32"}
    eight = {fqn for fqn, sch in schemes.items() if sch != "8da4w-g32"}
    calibrated = None
    if recipe.qparams == "asymmetric":
        _replace(decoder, four, to_group_offset)
        share_group_sums(decoder)
    elif recipe.calibrated:
        if calibration is None:
            raise InvalidArgument("--qparams gptq needs calibration text: give --calib-text FILE (validation text) "
                                  "or let the export sample it from the model")
        # what the blocks will read is quantized first (the LM head, the embedding that may share its integers),
        # so that block after block the calibration sees the artifact's own inputs
        in_blocks = _block_module_ids(decoder)
        modules = dict(decoder.named_modules())
        _replace(decoder, {f for f in eight if id(modules[f]) not in in_blocks}, DynamicQuantLinear.int8_per_channel)
        embedding = _quantize_embedding(decoder, recipe, emb, tied_source)
        calibrated = calibrated_4bit(decoder, four, calibration, progress=progress,
                                     eight={f for f in eight if id(modules[f]) in in_blocks}, after_block=after_block)
    else:  # torchao chooses the symmetric grid; its integers and scales go to the same export form
        quantize_(decoder, Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE), intx_choose_qparams_algorithm=recipe.qparams),
            filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in four)
        _replace(decoder, four, lambda lin: DynamicQuantLinear(lin.weight.qdata, lin.weight.scale, 4, GROUP_SIZE, lin.bias))
    if not recipe.calibrated:
        _replace(decoder, eight, DynamicQuantLinear.int8_per_channel)
        embedding = _quantize_embedding(decoder, recipe, emb, tied_source)
    return {"scheme": "8da4w", "recipe": asdict(recipe), "group_size": GROUP_SIZE,
            "linear_counts": dict(Counter(schemes.values())),
            "lm_head": schemes.get("lm_head", "none"), "embedding": embedding,
            "fallback_8bit": sorted(k for k, v in schemes.items() if v != "8da4w-g32" and not k.endswith("lm_head")),
            **({"calibration": calibrated} if calibrated is not None else {})}


# ---------------------------------------------------------------------------------------------- ONNX Runtime
#: ONNX Runtime's 4-bit artifact (``--quant 4bit``): ``MatMulNBits`` weights in blocks of this many input channels
BLOCK_SIZE = 32
#: the block grids: ``gptq`` (calibrated: smoothing, then GPTQ on asymmetric blocks) or ``minmax`` (round to nearest)
BLOCK_QPARAMS = ("gptq", "minmax")
#: the factors a calibrated asymmetric block's ``[min, max]`` range is shrunk by in its search (the smallest
#: weighted rounding error wins; 1.0, the plain min/max range, is one of them)
RANGE_FACTORS = torch.linspace(0.7, 1.0, 16)
#: the Linears (name suffixes) the ONNX 4-bit artifact keeps at 8-bit blocks when ``--keep-8bit`` is not given: the
#: attention's four, whose input is the hidden size (ONNX Runtime's 8-bit kernel costs about the 4-bit one's time
#: there, unlike on ``down_proj``'s wide input). Chosen on WikiText-2 validation (``benchmarks/onnx_4bit_recipes.py``:
#: dense SmolLM2, eager, dequantized weights, 4 x 512 tokens): all 4-bit 1.131x the fp32 perplexity, k/v 8-bit 1.088x,
#: q/k/v/o 8-bit 1.083x
ONNX_KEEP_8BIT: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class BlockRecipe:
    """How ``--quant 4bit`` (ONNX) quantizes a model (recorded in the manifest); ``BlockRecipe()`` is the default.

    ``qparams``: ``gptq`` (calibrated: smoothing folded into the weights, then GPTQ on asymmetric blocks, block of
    layers after block of layers, as :func:`calibrated_4bit`) or ``minmax`` (each block's min/max range rounded
    to nearest, no calibration). ``lm_head``: ``8bit`` or ``4bit`` blocks; a tied token embedding reads the head's
    own quantized table (``GatherBlockQuantized``), an untied one gets 4-bit min/max blocks. ``keep_8bit``: Linear
    names (suffixes) kept at 8-bit blocks. ``accuracy_level``: ``MatMulNBits``' compute type on CPU (4: int8
    activations, ONNX Runtime's fast path; 0: fp32). ``block_size``: 32 is the measured default; another size (API
    only) still has its smoothing searched on groups of 32.
    """

    qparams: str = "gptq"
    lm_head: str = "8bit"
    keep_8bit: list[str] | None = None
    block_size: int = BLOCK_SIZE
    accuracy_level: int = 4

    def __post_init__(self):
        if self.keep_8bit is None:
            self.keep_8bit = list(ONNX_KEEP_8BIT)

    @property
    def calibrated(self) -> bool:
        """Whether quantizing with this recipe needs calibration windows."""
        return self.qparams == "gptq"

    def check(self) -> None:
        for what, value, allowed in (("qparams", self.qparams, BLOCK_QPARAMS),
                                     ("LM head precision", self.lm_head, HEAD_PRECISIONS),
                                     ("accuracy level", self.accuracy_level, (0, 1, 2, 3, 4))):
            if value not in allowed:
                raise InvalidArgument(f"unknown {what} {value!r} for --quant 4bit; choose from "
                                      f"{', '.join(map(str, allowed))}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InvalidArgument(f"block size {self.block_size} is not a power of two of at least 16 "
                                  "(ONNX Runtime's MatMulNBits takes 16, 32, 64, 128, ...)")


DEFAULT_BLOCK_RECIPE = BlockRecipe()


def _on_blocks(g: torch.Tensor, s: torch.Tensor, z: torch.Tensor, top: int) -> torch.Tensor:
    """The integers ``q`` (as floats, ``0..top``) of blocks ``g [.., block]`` on the grid ``s·(q - z)`` (``s``, ``z``
    ``[..]``)."""
    return torch.clamp(torch.round(g / s[..., None]) + z[..., None], 0, top)


def asymmetric_blocks(g: torch.Tensor, bits: int, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and integer zero points of asymmetric ``bits``-bit blocks ``g [rows, n, block]``: ``w ≈ s·(q - z)``,
    ``q`` in ``0..2^bits - 1``, the range ``[min(g, 0), max(g, 0)]`` (zero is on the grid, as ONNX Runtime's own
    quantizer has it) shrunk by the :data:`RANGE_FACTORS` that minimise the rounding error weighted by
    ``weight [n, block]`` (the input channels' mean squares); without ``weight`` the plain range. Returns
    ``(s [rows, n], z [rows, n])``, ``z`` holding integers as floats."""
    top = 2**bits - 1
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if weight is None:
        s = ((hi - lo) / top).clamp(min=1e-10)
        return s, torch.round(-lo / s).clamp(0, top)
    f = RANGE_FACTORS.view(-1, *([1] * lo.dim()))  # every factor at once: [factors, rows, n]
    s = ((hi - lo)[None] * f / top).clamp(min=1e-10)
    z = torch.round(-lo[None] * f / s).clamp(0, top)
    err = (((_on_blocks(g[None], s, z, top) - z[..., None]) * s[..., None] - g[None]) ** 2 * weight).sum(-1)
    best = err.argmin(0, keepdim=True)  # the first factor wins a tie
    return s.gather(0, best)[0], z.gather(0, best)[0]


def _minmax_4bit_groups(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Groups ``g [.., n, group]`` rounded to asymmetric min/max 4-bit blocks, dequantized: what the ONNX recipe's
    smoothing search measures its error on (one pass, ``weight`` unused; GPTQ then searches each block's range).
    The XNNPACK recipe's symmetric grid with searched scales in its place took 95 of the 133 s of this quantizer on
    SmolLM2's first 3 layers (cProfile, beside another job); with this one the whole took 56 s."""
    s, z = asymmetric_blocks(g, 4)
    return (_on_blocks(g, s, z, 15) - z[..., None]) * s[..., None]


def _padded(w: torch.Tensor, block: int) -> torch.Tensor:
    """``w [out, in]`` with zero columns up to a whole number of blocks (MatMulNBits pads ``K`` the same way)."""
    pad = -w.shape[1] % block
    return F.pad(w.detach().float(), (0, pad)) if pad else w.detach().float().clone()


def minmax_blocks(w: torch.Tensor, bits: int, block: int = BLOCK_SIZE) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest asymmetric blocks of ``block`` input channels: ``(q uint8 [out, in padded], s [out, n],
    z uint8 [out, n])`` (padding columns hold ``z``: they dequantize to 0)."""
    wp = _padded(w, block)
    g = wp.reshape(wp.shape[0], -1, block)
    s, z = asymmetric_blocks(g, bits)
    return _on_blocks(g, s, z, 2**bits - 1).reshape_as(wp).to(torch.uint8), s, z.to(torch.uint8)


def gptq_blocks(w: torch.Tensor, gram: torch.Tensor, bits: int = 4, block: int = BLOCK_SIZE) -> tuple[torch.Tensor, ...]:
    """Asymmetric ``bits``-bit blocks of ``w [out, in]`` with GPTQ's error compensation (as :func:`gptq_4bit`, on
    ONNX Runtime's grid ``s·(q - z)``, each block's range searched by :func:`asymmetric_blocks` on the weights as
    the earlier blocks' errors left them). An input width that is not a multiple of ``block`` is padded with
    zero columns. Returns ``(q uint8 [out, in padded], s [out, n], z uint8 [out, n])``."""
    w = _padded(w, block)
    out, k = w.shape
    top = 2**bits - 1
    hinv, diag, dead = _gptq_inverse(gram, k)  # padding columns are dead inputs
    w[:, dead] = 0.0
    q = torch.empty(out, k, dtype=torch.uint8)
    scales = torch.empty(out, k // block)
    zeros = torch.empty(out, k // block)
    for gi, i0 in enumerate(range(0, k, block)):
        blk = w[:, i0:i0 + block]
        s, z = asymmetric_blocks(blk[:, None], bits, diag[i0:i0 + block][None])
        s, z = s[:, 0], z[:, 0]
        scales[:, gi], zeros[:, gi] = s, z
        hb = hinv[i0:i0 + block, i0:i0 + block]
        err = torch.empty_like(blk)
        for j in range(block):
            qi = torch.clamp(torch.round(blk[:, j] / s) + z, 0, top)
            q[:, i0 + j] = qi.to(torch.uint8)
            e = (blk[:, j] - (qi - z) * s) / hb[j, j]
            blk[:, j:] -= e[:, None] * hb[j, j:][None]
            err[:, j] = e
        w[:, i0 + block:] -= err @ hinv[i0:i0 + block, i0 + block:]
    return q, scales, zeros.to(torch.uint8)


class BlockQuantLinear(nn.Module):
    """A Linear whose weight is ONNX Runtime ``MatMulNBits`` blocks: ``w[o, k] = s[o, k/B]·(q[o, k] - z[o, k/B])``.

    ``q``: uint8 ``[out, in padded to B]`` (``0..2^bits - 1``); ``scales``: fp32 ``[out, n]``; ``zero_points``:
    uint8 ``[out, n]``. Eagerly it computes ``F.linear`` with the dequantized weight in fp32 (ONNX Runtime's
    ``accuracy_level`` 4 also rounds the activations to int8 per block); :func:`fasp_edge.export.onnx.export_onnx_4bit`
    writes the integers into the graph.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, bits: int, block: int,
                 in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.block, self.in_features = bits, block, in_features
        self.out_features = q.shape[0]
        self.register_buffer("q", q.to(torch.uint8))
        self.register_buffer("scales", scales.float())
        self.register_buffer("zero_points", zero_points.to(torch.uint8))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    @torch.no_grad()
    def minmax(cls, lin: nn.Linear, bits: int, block: int = BLOCK_SIZE) -> "BlockQuantLinear":
        return cls(*minmax_blocks(lin.weight, bits, block), bits, block, lin.in_features, lin.bias)

    @classmethod
    @torch.no_grad()
    def gptq(cls, lin: nn.Linear, gram: torch.Tensor, bits: int = 4, block: int = BLOCK_SIZE) -> "BlockQuantLinear":
        return cls(*gptq_blocks(lin.weight, gram, bits, block), bits, block, lin.in_features, lin.bias)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight ``[out, in]`` the blocks hold."""
        z = self.zero_points.float().repeat_interleave(self.block, 1)
        s = self.scales.repeat_interleave(self.block, 1)
        return ((self.q.float() - z) * s)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.__dict__.get("_eager_weight")
        if w is None:
            w = self.__dict__["_eager_weight"] = self.dequantized()
        return F.linear(x, w, self.bias)

    def drop_eager_weight(self) -> None:
        self.__dict__.pop("_eager_weight", None)


def block_schemes(decoder: nn.Module, recipe: BlockRecipe) -> dict[str, int]:
    """The bits each Linear of ``decoder`` gets under ``recipe`` (every input width works: ``K`` is padded)."""
    out = {}
    for name, mod in decoder.named_modules():
        if isinstance(mod, nn.Linear):
            if name.endswith("lm_head"):
                out[name] = 4 if recipe.lm_head == "4bit" else 8
            else:
                out[name] = 8 if any(name.endswith(k) for k in recipe.keep_8bit) else 4
    return out


@torch.no_grad()
def quantize_blockwise(decoder: nn.Module, recipe: BlockRecipe = DEFAULT_BLOCK_RECIPE,
                       calibration: torch.Tensor | None = None, progress: bool = False) -> dict:
    """Replace ``decoder``'s Linears (an :class:`~fasp_edge.models.decoder.ExportDecoder`, static cache) by
    :class:`BlockQuantLinear` as ``recipe`` says: 8-bit Linears outside the blocks (the LM head) first, by min/max
    blocks; then, calibrated (``qparams="gptq"``, on ``calibration [n, T]``), :func:`calibrated_4bit`'s smoothing and
    block-by-block GPTQ with :func:`gptq_blocks` (8-bit kept Linears: min/max blocks, after their block's 4-bit
    ones), or min/max blocks throughout. The smoothing rescales norms and Linears shared with the source model.
    Returns what the manifest records of it."""
    recipe.check()
    b = recipe.block_size
    schemes = block_schemes(decoder, recipe)
    four = {f for f, bits in schemes.items() if bits == 4}
    eight = {f for f, bits in schemes.items() if bits == 8}
    calibrated = None
    make_eight = lambda lin: BlockQuantLinear.minmax(lin, 8, b)  # noqa: E731
    if recipe.calibrated:
        if calibration is None:
            raise InvalidArgument("--quant 4bit with --qparams gptq needs calibration text: give --calib-text FILE "
                                  "(validation text) or let the export sample it from the model")
        in_blocks = _block_module_ids(decoder)
        modules = dict(decoder.named_modules())
        _replace(decoder, {f for f in eight if id(modules[f]) not in in_blocks}, make_eight)
        calibrated = calibrated_4bit(decoder, four, calibration, progress=progress,
                                     eight={f for f in eight if id(modules[f]) in in_blocks},
                                     make_four=lambda lin, gram: BlockQuantLinear.gptq(lin, gram, 4, b),
                                     make_eight=make_eight, smoothing_grid=_minmax_4bit_groups)
    else:
        _replace(decoder, four, lambda lin: BlockQuantLinear.minmax(lin, 4, b))
        _replace(decoder, eight, make_eight)
    counts = Counter(f"{bits}-bit blocks of {b}" for bits in schemes.values())
    return {"scheme": "MatMulNBits", "recipe": asdict(recipe), "block_size": b, "linear_counts": dict(counts),
            "lm_head": f"{schemes.get('lm_head', 0)}-bit" if "lm_head" in schemes else "none",
            "kept_8bit": sorted(f for f in eight if not f.endswith("lm_head")),
            **({"calibration": calibrated} if calibrated is not None else {})}
