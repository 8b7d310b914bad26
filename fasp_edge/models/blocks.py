"""The building blocks every family's export block is made of: KV-cache attention (an eager ``io`` form for
ONNX and a static-cache form over ExecuTorch's ``llama::`` custom ops), rotary helpers, the RMSNorm test,
and the records a family hands to :class:`~fasp_edge.models.decoder.ExportDecoder`.

A block calls ``step.norm(module, x)`` and ``step.attention(attn, x, i)``; the decoder's step object decides
how (see :mod:`fasp_edge.models.decoder`), so a family's block is written once for both cache modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ExportParts:
    """The whole-model pieces a family hands to the export decoder (the blocks come per layer).

    ``extra`` holds what only that family's :meth:`~fasp_edge.models.base.ModelFamily.export_embed` /
    :meth:`~fasp_edge.models.base.ModelFamily.export_head_input` read (OPT: its input and output projections, learned
    positions and their offset); the decoder keeps each under its name, in this order.
    """

    embed_tokens: nn.Module
    lm_head: nn.Module
    final_norm: nn.Module | None = None
    rotary: nn.Module | None = None  # transformers' rotary embedding (inv_freq, attention_scaling)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LayerDims:
    """Per-layer shapes recorded in the bundle manifest."""

    ffn_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked attention with grouped query heads (GQA) without copying the cache per query head.

    ``q`` is ``[1, H, T, D]``; ``k``/``v`` are ``[1, KV, S, D]`` / ``[1, KV, S, Dv]``; query head ``h`` reads
    KV head ``h // (H // KV)``; ``mask`` is ``[T, S]`` (0 or -inf).
    """
    b, h, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    # heads of one group are contiguous (transformers' repeat_kv order): [1, KV, G, T, D] -> [1, KV, G*T, D]
    qg = q.reshape(b, kv, g, t, d).flatten(2, 3)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [1, KV, G*T, S]
    scores = scores.unflatten(2, (g, t)) + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).flatten(2, 3)
    return torch.matmul(probs, v).unflatten(2, (g, t)).reshape(b, h, t, v.shape[-1])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_matrix(d: int) -> torch.Tensor:
    """``R`` with ``F.linear(x, R) == rotate_half(x)`` (``cat(-x2, x1)``): a ±1 permutation, exact in fp32."""
    h = d // 2
    r = torch.zeros(d, d)
    idx = torch.arange(h)
    r[idx, idx + h] = -1.0  # out[i] = -x[i + h]
    r[idx + h, idx] = 1.0  # out[i + h] = x[i]
    return r


def is_rms_norm(module: nn.Module | None) -> bool:
    """transformers' LLaMA/Mistral/Qwen2 RMSNorm: ``weight * x * rsqrt(mean(x²) + variance_epsilon)``."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1 and hasattr(module, "variance_epsilon")
            and getattr(module, "bias", None) is None)


def load_custom_ops() -> None:
    """Register ExecuTorch's ``llama::update_cache`` / ``llama::custom_sdpa`` (eager, export and runtime kernels)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


#: how the static cache gives a pruned value head (``v_head_dim < head_dim``) the Q/K head dim that
#: ``custom_sdpa`` needs (its key and value caches must have one shape):
#: ``"select"``: V is padded with zero columns by a constant ``[D, Dv]`` linear, the attention output is cut
#: back to ``Dv`` by a constant ``[Dv, D]`` linear (both inside the XNNPACK delegate), ``o_proj`` is the model's;
#: ``"slice"``: the same padding, the output cut with a slice (a non-delegated ``slice_copy`` per layer);
#: ``"wide"``: new plain ``nn.Linear`` ``v_proj`` / ``o_proj`` with zero rows / zero columns inserted per head.
VALUE_PAD_MODES = ("select", "slice", "wide")


class Attention(nn.Module):
    """Self-attention over a KV cache; the projections are the source model's modules."""

    def __init__(self, src: nn.Module, family, layer: nn.Module, rope: bool, q_scale_first: bool):
        super().__init__()
        lay = family.attention_layout(layer)
        self.q_proj, self.k_proj, self.v_proj = src.q_proj, src.k_proj, family.attn_in(layer)
        self.o_proj = family.attn_out(layer)
        self.num_heads, self.num_kv_heads = lay.num_heads, lay.num_kv_heads
        self.head_dim, self.v_head_dim = lay.head_dim, lay.v_head_dim
        self.scale = float(getattr(src, "scaling", lay.head_dim**-0.5))
        self.rope = rope
        self.q_scale_first = q_scale_first  # OPT scales q before the product (as transformers does)
        self.value_pad: str | None = None  # set by setup_static when v_head_dim < head_dim

    def shape_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys split into heads, before RoPE (head dim last): a family whose attention normalizes
        them (e.g. per-head q/k norms) overrides this in its own module; identity here."""
        return q, k

    # ---------------------------------------------------------------- "io" mode (ONNX)
    def project(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
        b, t, _ = x.shape
        q = self.q_proj(x)
        if self.q_scale_first:
            q = q * self.scale
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.v_head_dim).transpose(1, 2)
        q, k = self.shape_qk(q, k)
        if self.rope:
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def finish(self, q, k_all, v_all, mask, fused: bool = False) -> torch.Tensor:
        scale = 1.0 if self.q_scale_first else self.scale
        if fused:  # one op: ONNX's opset-23 Attention when exported (grouped heads, a smaller value head allowed)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale,
                                                 enable_gqa=self.num_kv_heads < self.num_heads)
        else:
            out = _attend(q, k_all, v_all, mask, scale)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.v_head_dim))

    # ---------------------------------------------------------------- "static" mode (ExecuTorch)
    def setup_static(self, value_pad: str) -> None:
        """Prepare the custom-op attention; a pruned value head is padded to ``head_dim`` (see VALUE_PAD_MODES)."""
        d, dv = self.head_dim, self.v_head_dim
        if dv == d:
            return
        if dv > d:
            raise ValueError(f"value head dim {dv} exceeds the Q/K head dim {d}")
        self.value_pad = value_pad
        if value_pad == "wide":
            self.v_proj, self.o_proj = _widened_v_proj(self.v_proj, self.num_kv_heads, dv, d), \
                _widened_o_proj(self.o_proj, self.num_heads, dv, d)
            return
        eye = torch.eye(d)
        self.register_buffer("v_pad", eye[:, :dv].clone(), persistent=False)  # [D, Dv]: v -> [v, 0]
        if value_pad == "select":
            self.register_buffer("v_select", eye[:dv].clone(), persistent=False)  # [Dv, D]: y -> y[:Dv]

    def attend_static(self, x: torch.Tensor, rope, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      start, use_ops: bool) -> torch.Tensor:
        """Attention of ``x [1, T, hidden]`` at positions ``start..start+T-1`` over the static caches.

        The caches are ``[1, max_context, kv_heads, head_dim]``; every reshape has one ``-1`` and no symbolic
        size, so XNNPACK keeps it. With ``use_ops`` (always under ``torch.export``) the cache write and the
        attention are ``llama::update_cache`` / ``llama::custom_sdpa``, the only ops left outside the
        delegate; otherwise the same computation in plain PyTorch (:func:`_cache_attention_eager`).
        """
        h, kv, d, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        q = self.q_proj(x)
        if self.q_scale_first:
            q = q * self.scale
        q = q.view(1, -1, h, d)
        k = self.k_proj(x).view(1, -1, kv, d)
        v = self.v_proj(x).view(1, -1, kv, d if self.value_pad == "wide" else dv)
        q, k = self.shape_qk(q, k)
        if rope is not None:
            cos, sin, rot = rope  # [1, T, 1, D], [1, T, 1, D], [D, D]
            q = q * cos + F.linear(q, rot) * sin
            k = k * cos + F.linear(k, rot) * sin
        if self.value_pad in ("select", "slice"):
            v = F.linear(v, self.v_pad)
        scale = 1.0 if self.q_scale_first else self.scale
        if use_ops:
            torch.ops.llama.update_cache(k, k_cache, start)
            torch.ops.llama.update_cache(v, v_cache, start)
            y = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True, scale)  # [1, T, H, D]
        else:
            y = _cache_attention_eager(q, k, v, k_cache, v_cache, start, scale)
        if self.value_pad == "select":
            return self.o_proj(F.linear(y, self.v_select).view(1, -1, h * dv))
        if self.value_pad == "slice":
            return self.o_proj(y[..., :dv].reshape(1, -1, h * dv))
        return self.o_proj(y.view(1, -1, h * d))


def _cache_attention_eager(q, k, v, k_cache, v_cache, start: int, scale: float) -> torch.Tensor:
    """What ``update_cache`` x2 + ``custom_sdpa(..., is_causal=True)`` compute, in plain PyTorch.

    Used when running eagerly: the eager kernels of the custom ops log two "No temp allocator provided"
    lines to stderr per call, which would flood the torch engine and the parity checks.
    """
    t = q.shape[1]
    k_cache.narrow(1, start, t).copy_(k)
    v_cache.narrow(1, start, t).copy_(v)
    n = start + t
    q_pos = torch.arange(t).unsqueeze(1) + start
    mask = torch.where(torch.arange(n).unsqueeze(0) <= q_pos, 0.0, float("-inf"))
    out = _attend(q.transpose(1, 2), k_cache[:, :n].transpose(1, 2), v_cache[:, :n].transpose(1, 2), mask, scale)
    return out.transpose(1, 2).contiguous()


def _widened_v_proj(v: nn.Linear, heads: int, dv: int, d: int) -> nn.Linear:
    """A plain Linear whose output is ``v``'s with ``d - dv`` zero rows after each head's ``dv`` rows."""
    with torch.no_grad():
        out = nn.Linear(v.in_features, heads * d, bias=v.bias is not None, device=v.weight.device,
                        dtype=v.weight.dtype)
        out.weight.zero_()
        out.weight.view(heads, d, -1)[:, :dv] = v.weight.view(heads, dv, -1)
        if v.bias is not None:
            out.bias.zero_()
            out.bias.view(heads, d)[:, :dv] = v.bias.view(heads, dv)
    return out


def _widened_o_proj(o: nn.Linear, heads: int, dv: int, d: int) -> nn.Linear:
    """A plain Linear over ``heads * d`` inputs equal to ``o`` on each head's first ``dv`` (zero columns after)."""
    with torch.no_grad():
        out = nn.Linear(heads * d, o.out_features, bias=o.bias is not None, device=o.weight.device,
                        dtype=o.weight.dtype)
        out.weight.zero_()
        out.weight.view(o.out_features, heads, d)[:, :, :dv] = o.weight.view(o.out_features, heads, dv)
        if o.bias is not None:
            out.bias.copy_(o.bias)
    return out
