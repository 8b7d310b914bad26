"""One export-friendly decoder for every supported family, dense or pruned.

:class:`ExportDecoder` re-uses the source model's own weight modules (Linear, Embedding, norm weights) and
re-writes only what export needs to be static: positions, masks and the KV cache. Per-layer shapes come
from the modules themselves, so a FASP-pruned model (smaller FFN, value head dim below the Q/K head dim)
exports exactly like a dense one.

Two cache modes share all the block code (a block calls ``step.norm`` / ``step.attention``):

* ``"static"`` (ExecuTorch): ``forward(tokens [1, T], input_pos [1]) -> logits``; the KV cache lives in
  buffers ``[1, max_context, kv_heads, head_dim]`` written at ``input_pos``. Under ``torch.export`` the
  write and the causal attention are ExecuTorch's ``llama::update_cache`` / ``llama::custom_sdpa`` (GQA
  native, reads only the filled positions); everything else is written so that XNNPACK delegates it:
  RMSNorm's mean as a linear with a constant ``1/D`` row, RoPE's ``rotate_half`` as a linear with a
  constant ±1 matrix, cos/sin tables pre-shaped ``[1, S, 1, D]``, reshapes with one ``-1`` and no symbolic
  size, float scalars. A pruned value head is padded to ``head_dim`` (custom_sdpa needs K and V of one
  shape; see :data:`VALUE_PAD_MODES`). Run eagerly, the same computation runs in plain PyTorch. This is the
  calling convention of ExecuTorch's LLM runner.
* ``"io"`` (ONNX): ``forward(tokens, *past) -> (logits, *present)`` with explicit past/present key and
  value tensors per layer (``[1, kv_heads, past, head_dim]`` keys, ``[1, kv_heads, past, v_head_dim]``
  values); the position is the past length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidArgument
from ..models import family_for


@dataclass
class ExportParts:
    """The whole-model pieces a family hands to the export decoder (the blocks come per layer)."""

    embed_tokens: nn.Module
    lm_head: nn.Module
    final_norm: nn.Module | None = None
    project_in: nn.Module | None = None
    project_out: nn.Module | None = None
    embed_positions: nn.Embedding | None = None  # learned absolute positions (OPT)
    position_offset: int = 0
    rotary: nn.Module | None = None  # transformers' rotary embedding (inv_freq, attention_scaling)


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


def _rotate_half_matrix(d: int) -> torch.Tensor:
    """``R`` with ``F.linear(x, R) == rotate_half(x)`` (``cat(-x2, x1)``): a ±1 permutation, exact in fp32."""
    h = d // 2
    r = torch.zeros(d, d)
    idx = torch.arange(h)
    r[idx, idx + h] = -1.0  # out[i] = -x[i + h]
    r[idx + h, idx] = 1.0  # out[i + h] = x[i]
    return r


def _is_rms_norm(module: nn.Module | None) -> bool:
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


class _Attention(nn.Module):
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

    # ---------------------------------------------------------------- "io" mode (ONNX)
    def project(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
        b, t, _ = x.shape
        q = self.q_proj(x)
        if self.q_scale_first:
            q = q * self.scale
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.v_head_dim).transpose(1, 2)
        if self.rope:
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def finish(self, q, k_all, v_all, mask) -> torch.Tensor:
        out = _attend(q, k_all, v_all, mask, 1.0 if self.q_scale_first else self.scale)
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


class _IOStep:
    """One forward of the ``io`` mode: the source norms, HF-style RoPE, past/present tensors."""

    def __init__(self, cos, sin, cache_fns):
        self.cos, self.sin, self.cache_fns = cos, sin, cache_fns

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def attention(self, attn: _Attention, x: torch.Tensor, i: int) -> torch.Tensor:
        q, k, v = attn.project(x, self.cos, self.sin)
        k_all, v_all, mask = self.cache_fns[i](k, v)
        return attn.finish(q, k_all, v_all, mask)


class _StaticStep:
    """One forward of the ``static`` mode: delegable RMSNorm and RoPE, ``llama::`` cache and attention ops."""

    def __init__(self, decoder: "ExportDecoder", start, rope):
        self.decoder, self.start, self.rope = decoder, start, rope
        self.use_ops = decoder.eager_custom_ops or torch.compiler.is_exporting()
        if self.use_ops:
            load_custom_ops()

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not _is_rms_norm(module):
            return module(x)
        # mean(x²) as a linear with a constant 1/D row: XNNPACK keeps it (mean.dim on rank 3 it does not)
        avg = getattr(self.decoder, f"rms_avg_{module.weight.shape[0]}")
        return x * torch.rsqrt(F.linear(x * x, avg) + float(module.variance_epsilon)) * module.weight

    def attention(self, attn: _Attention, x: torch.Tensor, i: int) -> torch.Tensor:
        d = self.decoder
        return attn.attend_static(x, self.rope, getattr(d, f"k_cache_{i}"), getattr(d, f"v_cache_{i}"), self.start,
                                  self.use_ops)


class PreNormGatedBlock(nn.Module):
    """LLaMA-like block: RMSNorm, RoPE attention, gated (SwiGLU) MLP, pre-norm residuals."""

    def __init__(self, family, layer):
        super().__init__()
        self.attn = _Attention(layer.self_attn, family, layer, rope=True, q_scale_first=False)
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.gate_proj, self.up_proj = family.mlp_in(layer)
        self.down_proj = family.mlp_out(layer)
        self.act = layer.mlp.act_fn

    def norms(self) -> list[nn.Module]:
        return [self.input_layernorm, self.post_attention_layernorm]

    def forward(self, x, step, i: int):
        x = x + step.attention(self.attn, step.norm(self.input_layernorm, x), i)
        h = step.norm(self.post_attention_layernorm, x)
        return x + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))


class OPTBlock(nn.Module):
    """OPT block: LayerNorm before (pre-LN) or after (post-LN) each residual, ReLU MLP, learned positions."""

    def __init__(self, family, layer):
        super().__init__()
        self.attn = _Attention(layer.self_attn, family, layer, rope=False, q_scale_first=True)
        self.self_attn_layer_norm, self.final_layer_norm = layer.self_attn_layer_norm, layer.final_layer_norm
        (self.fc1,) = family.mlp_in(layer)
        self.fc2 = family.mlp_out(layer)
        self.act = layer.activation_fn
        self.pre_ln = layer.do_layer_norm_before

    def norms(self) -> list[nn.Module]:
        return [self.self_attn_layer_norm, self.final_layer_norm]

    def forward(self, x, step, i: int):
        h = step.norm(self.self_attn_layer_norm, x) if self.pre_ln else x
        x = x + step.attention(self.attn, h, i)
        if not self.pre_ln:
            x = step.norm(self.self_attn_layer_norm, x)
        h = step.norm(self.final_layer_norm, x) if self.pre_ln else x
        x = x + self.fc2(self.act(self.fc1(h)))
        if not self.pre_ln:
            x = step.norm(self.final_layer_norm, x)
        return x


class ExportDecoder(nn.Module):
    """Export-ready decoder over a supported HF causal LM (see the module docstring for the modes).

    ``value_pad`` (static mode, pruned value heads only) is one of :data:`VALUE_PAD_MODES`.
    """

    def __init__(self, model: nn.Module, *, max_context: int, cache: str = "static", full_logits: bool = False,
                 value_pad: str = "select"):
        super().__init__()
        if cache not in ("static", "io"):
            raise ValueError(f"cache must be 'static' or 'io', got {cache!r}")
        if value_pad not in VALUE_PAD_MODES:
            raise ValueError(f"value_pad must be one of {VALUE_PAD_MODES}, got {value_pad!r}")
        family = family_for(model)
        cfg = model.config
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and max_context > limit:
            raise InvalidArgument(f"--max-context {max_context} exceeds the model's {limit} positions; lower it")
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        if window is not None and max_context > window:
            raise InvalidArgument(f"--max-context {max_context} exceeds the sliding window ({window}); lower it")
        self.family_name = family.name
        self.cache, self.max_context, self.full_logits = cache, max_context, full_logits
        self.vocab_size = cfg.vocab_size
        layers = family.layers(model)
        parts = family.export_parts(model)
        self.blocks = nn.ModuleList([family.export_block(layer) for layer in layers])
        self.embed_tokens, self.project_in, self.project_out = parts.embed_tokens, parts.project_in, parts.project_out
        self.embed_positions, self.position_offset = parts.embed_positions, parts.position_offset
        self.final_norm = parts.final_norm
        self.rope = parts.rotary is not None
        if self.rope:
            rot = parts.rotary
            pos = torch.arange(max_context, dtype=torch.float32)
            freqs = torch.outer(pos, rot.inv_freq.float().cpu())
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * rot.attention_scaling, emb.sin() * rot.attention_scaling
            if cache == "static":  # pre-shaped [1, S, 1, D]: no unsqueeze outside the delegate
                cos, sin = cos[None, :, None, :], sin[None, :, None, :]
                self.register_buffer("rope_rot", _rotate_half_matrix(emb.shape[-1]), persistent=False)
            self.register_buffer("rope_cos", cos.contiguous(), persistent=False)
            self.register_buffer("rope_sin", sin.contiguous(), persistent=False)
        self.lm_head = parts.lm_head
        self.dims = [LayerDims(family.ffn_dim(layer), *(lambda a: (a.num_heads, a.num_kv_heads, a.head_dim,
                                                                   a.v_head_dim))(family.attention_layout(layer)))
                     for layer in layers]
        if cache == "static":
            self.value_pad = value_pad
            #: run the llama:: custom ops eagerly too (they are always used under torch.export); off by
            #: default because their eager kernels log to stderr on every call
            self.eager_custom_ops = False
            norms = [n for b in self.blocks for n in b.norms()] + [self.final_norm]
            for size in sorted({n.weight.shape[0] for n in norms if _is_rms_norm(n)}):
                self.register_buffer(f"rms_avg_{size}", torch.full((1, size), 1.0 / size), persistent=False)
            for i, (d, block) in enumerate(zip(self.dims, self.blocks)):
                block.attn.setup_static(value_pad)
                # key and value caches of one shape (custom_sdpa needs it): a pruned value head is padded
                shape = (1, max_context, d.num_kv_heads, d.head_dim)
                self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
                self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    # ---------------------------------------------------------------------------------------------
    def _embed(self, tokens: torch.Tensor, start, t: int) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.embed_positions is not None:
            pos = self.embed_positions.weight.narrow(0, start + self.position_offset, t)
            x = x + pos.unsqueeze(0)
        return x

    def _rope(self, start, t: int):  # io mode: [1, 1, T, D] tables
        if not self.rope:
            return None, None
        return self.rope_cos.narrow(0, start, t)[None, None], self.rope_sin.narrow(0, start, t)[None, None]

    def _head_input(self, x: torch.Tensor, step) -> torch.Tensor:
        """What the LM head reads: the last block's output through the final norm (and OPT's ``project_out``)."""
        if self.final_norm is not None:
            x = step.norm(self.final_norm, x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def _head(self, x: torch.Tensor, step) -> torch.Tensor:
        if not self.full_logits:
            x = x[:, -1:, :]
        x = self._head_input(x, step)
        if self.cache == "static" and not self.full_logits:
            # [1, 1, hidden] -> [1, hidden] before the head: a view XNNPACK keeps (a select of the logits
            # would run outside the delegate)
            return self.lm_head(x.view(1, -1))
        logits = self.lm_head(x)
        return logits if self.full_logits else logits[:, -1, :]

    def reset_cache(self) -> None:
        """Zero the static KV cache (a new sequence; positions restart at 0)."""
        for i in range(len(self.blocks)):
            getattr(self, f"k_cache_{i}").zero_()
            getattr(self, f"v_cache_{i}").zero_()

    def forward(self, tokens: torch.Tensor, *args: torch.Tensor):
        return self._forward_static(tokens, args[0]) if self.cache == "static" else self._forward_io(tokens, args)

    # ---------------------------------------------------------------- one stage at a time (static mode, eager)
    # A window run piece by piece, positions from 0, as ``forward(window, [0])`` runs it whole: what a quantizer
    # that calibrates block after block (``quantize.calibrated_4bit``) needs.
    def embed_window(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first block's input for ``tokens [1, T]`` at positions ``0..T-1``."""
        return self._embed(tokens, 0, tokens.shape[1])

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on ``x [1, T, hidden]`` at positions ``0..T-1`` (it writes its own cache, as forward does)."""
        t = x.shape[1]
        rope = (self.rope_cos.narrow(1, 0, t), self.rope_sin.narrow(1, 0, t), self.rope_rot) if self.rope else None
        return self.blocks[i](x, _StaticStep(self, 0, rope), i)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of every position of the last block's output ``x [1, T, hidden]``."""
        return self.lm_head(self._head_input(x, _StaticStep(self, 0, None)))

    def _forward_static(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + t <= self.max_context)
        x = self._embed(tokens, start, t)
        rope = None
        if self.rope:
            rope = (self.rope_cos.narrow(1, start, t), self.rope_sin.narrow(1, start, t), self.rope_rot)
        step = _StaticStep(self, start, rope)
        for i, block in enumerate(self.blocks):
            x = block(x, step, i)
        return self._head(x, step)

    def _forward_io(self, tokens: torch.Tensor, past: tuple[torch.Tensor, ...]):
        t = tokens.shape[1]
        p = past[0].shape[2]
        x = self._embed(tokens, p, t)
        cos, sin = self._rope(p, t)
        q_pos = torch.arange(t, device=tokens.device).unsqueeze(1) + p
        k_pos = torch.arange(p + t, device=tokens.device).unsqueeze(0)
        mask = torch.where(k_pos <= q_pos, 0.0, float("-inf"))
        present: list[torch.Tensor] = []
        cache_fns = []
        for i in range(len(self.blocks)):
            past_k, past_v = past[2 * i], past[2 * i + 1]

            def cache_fn(k, v, past_k=past_k, past_v=past_v):
                k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                present.extend((k_all, v_all))
                return k_all, v_all, mask

            cache_fns.append(cache_fn)
        step = _IOStep(cos, sin, cache_fns)
        for i, block in enumerate(self.blocks):
            x = block(x, step, i)
        return (self._head(x, step), *present)

    def empty_past(self, length: int = 0) -> list[torch.Tensor]:
        """Zero past key/value tensors of ``length`` positions for the ``io`` mode."""
        out = []
        for d in self.dims:
            out += [torch.zeros(1, d.num_kv_heads, length, d.head_dim), torch.zeros(1, d.num_kv_heads, length, d.v_head_dim)]
        return out


def check_export_parity(model: nn.Module, decoder: ExportDecoder, prompt: torch.Tensor, steps: int) -> dict:
    """Max |Δlogits| between the source model and the decoder over a prefill and ``steps`` decode steps.

    The decode steps feed the source model's own greedy tokens, so both see the same sequence.
    """
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        ref = model(prompt, past_key_values=cache, use_cache=True)
        ref_logits = [ref.logits[0]]
        tokens = [ref.logits[0, -1].argmax()]
        for _ in range(steps):
            out = model(tokens[-1].view(1, 1), past_key_values=cache, use_cache=True)
            ref_logits.append(out.logits[0])
            tokens.append(out.logits[0, -1].argmax())
        seq = torch.cat([prompt[0], torch.stack(tokens[:-1])]).unsqueeze(0)
        got = run_decoder(decoder, seq, prompt.shape[1])
    def diff(g: torch.Tensor, r: torch.Tensor) -> float:
        return (g - r[-g.shape[0]:]).abs().max().item()  # a last-token-only decoder compares the last row

    prefill = diff(got[0], ref_logits[0])
    decode = max((diff(g, r) for g, r in zip(got[1:], ref_logits[1:])), default=0.0)
    return {"prefill_tokens": prompt.shape[1], "decode_steps": steps, "prefill_max_abs_diff": prefill,
            "decode_max_abs_diff": decode, "max_abs_diff": max(prefill, decode),
            "max_abs_logit": max(r.abs().max().item() for r in ref_logits)}


def run_decoder(decoder: ExportDecoder, seq: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    """Logits of a prefill of ``prefill`` tokens then one step per remaining token (``[T, V]`` each)."""
    out = []
    if decoder.cache == "static":
        decoder.reset_cache()
        out.append(decoder(seq[:, :prefill], torch.tensor([0])))
        for i in range(prefill, seq.shape[1]):
            out.append(decoder(seq[:, i : i + 1], torch.tensor([i])))
    else:
        res = decoder(seq[:, :prefill], *decoder.empty_past())
        out.append(res[0])
        past = list(res[1:])
        for i in range(prefill, seq.shape[1]):
            res = decoder(seq[:, i : i + 1], *past)
            out.append(res[0])
            past = list(res[1:])
    return [o[0] if o.dim() == 3 else o for o in out]  # [T, V], or [1, V] for last-token logits
