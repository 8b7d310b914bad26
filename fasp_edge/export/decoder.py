"""One export-friendly decoder for every supported family, dense or pruned.

:class:`ExportDecoder` re-uses the source model's own weight modules (Linear, Embedding, norms) and
re-writes only what export needs to be static: positions, masks and the KV cache. Per-layer shapes come
from the modules themselves, so a FASP-pruned model (smaller FFN, value head dim below the Q/K head dim)
exports exactly like a dense one.

Two cache modes share all the block code:

* ``"static"`` (ExecuTorch): ``forward(tokens [1, T], input_pos [1]) -> logits``; the KV cache lives in
  buffers of ``max_context`` positions, written at ``input_pos`` with ``narrow().copy_()``; attention runs
  over the whole buffer under a causal mask. This is the calling convention of ExecuTorch's LLM runner.
* ``"io"`` (ONNX): ``forward(tokens, *past) -> (logits, *present)`` with explicit past/present key and
  value tensors per layer (``[1, kv_heads, past, head_dim]`` keys, ``[1, kv_heads, past, v_head_dim]``
  values); the position is the past length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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


class PreNormGatedBlock(nn.Module):
    """LLaMA-like block: RMSNorm, RoPE attention, gated (SwiGLU) MLP, pre-norm residuals."""

    def __init__(self, family, layer):
        super().__init__()
        self.attn = _Attention(layer.self_attn, family, layer, rope=True, q_scale_first=False)
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.gate_proj, self.up_proj = family.mlp_in(layer)
        self.down_proj = family.mlp_out(layer)
        self.act = layer.mlp.act_fn

    def forward(self, x, cos, sin, cache_fn):
        q, k, v = self.attn.project(self.input_layernorm(x), cos, sin)
        k_all, v_all, mask = cache_fn(k, v)
        x = x + self.attn.finish(q, k_all, v_all, mask)
        h = self.post_attention_layernorm(x)
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

    def forward(self, x, cos, sin, cache_fn):
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        q, k, v = self.attn.project(h, None, None)
        k_all, v_all, mask = cache_fn(k, v)
        x = x + self.attn.finish(q, k_all, v_all, mask)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(self.act(self.fc1(h)))
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x


class ExportDecoder(nn.Module):
    """Export-ready decoder over a supported HF causal LM (see the module docstring for the modes)."""

    def __init__(self, model: nn.Module, *, max_context: int, cache: str = "static", full_logits: bool = False):
        super().__init__()
        if cache not in ("static", "io"):
            raise ValueError(f"cache must be 'static' or 'io', got {cache!r}")
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
            self.register_buffer("rope_cos", emb.cos() * rot.attention_scaling, persistent=False)
            self.register_buffer("rope_sin", emb.sin() * rot.attention_scaling, persistent=False)
        self.lm_head = parts.lm_head
        self.dims = [LayerDims(family.ffn_dim(layer), *(lambda a: (a.num_heads, a.num_kv_heads, a.head_dim,
                                                                   a.v_head_dim))(family.attention_layout(layer)))
                     for layer in layers]
        if cache == "static":
            mask = torch.full((max_context, max_context), float("-inf")).triu(1)
            self.register_buffer("causal_mask", mask, persistent=False)
            for i, d in enumerate(self.dims):
                self.register_buffer(f"k_cache_{i}", torch.zeros(1, d.num_kv_heads, max_context, d.head_dim),
                                     persistent=False)
                self.register_buffer(f"v_cache_{i}", torch.zeros(1, d.num_kv_heads, max_context, d.v_head_dim),
                                     persistent=False)

    # ---------------------------------------------------------------------------------------------
    def _embed(self, tokens: torch.Tensor, start, t: int) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.embed_positions is not None:
            pos = self.embed_positions.weight.narrow(0, start + self.position_offset, t)
            x = x + pos.unsqueeze(0)
        return x

    def _rope(self, start, t: int):
        if not self.rope:
            return None, None
        return self.rope_cos.narrow(0, start, t)[None, None], self.rope_sin.narrow(0, start, t)[None, None]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if not self.full_logits:
            x = x[:, -1:, :]
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        logits = self.lm_head(x)
        return logits if self.full_logits else logits[:, -1, :]

    def reset_cache(self) -> None:
        """Zero the static KV cache (a new sequence; positions restart at 0)."""
        for i in range(len(self.blocks)):
            getattr(self, f"k_cache_{i}").zero_()
            getattr(self, f"v_cache_{i}").zero_()

    def forward(self, tokens: torch.Tensor, *args: torch.Tensor):
        return self._forward_static(tokens, args[0]) if self.cache == "static" else self._forward_io(tokens, args)

    def _forward_static(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + t <= self.max_context)
        x = self._embed(tokens, start, t)
        cos, sin = self._rope(start, t)
        mask = self.causal_mask.narrow(0, start, t)
        for i, block in enumerate(self.blocks):
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")

            def cache_fn(k, v, k_cache=k_cache, v_cache=v_cache):
                k_cache.narrow(2, start, t).copy_(k)
                v_cache.narrow(2, start, t).copy_(v)
                return k_cache, v_cache, mask

            x = block(x, cos, sin, cache_fn)
        return self._head(x)

    def _forward_io(self, tokens: torch.Tensor, past: tuple[torch.Tensor, ...]):
        t = tokens.shape[1]
        p = past[0].shape[2]
        x = self._embed(tokens, p, t)
        cos, sin = self._rope(p, t)
        q_pos = torch.arange(t, device=tokens.device).unsqueeze(1) + p
        k_pos = torch.arange(p + t, device=tokens.device).unsqueeze(0)
        mask = torch.where(k_pos <= q_pos, 0.0, float("-inf"))
        present: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            past_k, past_v = past[2 * i], past[2 * i + 1]

            def cache_fn(k, v, past_k=past_k, past_v=past_v):
                k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                present.extend((k_all, v_all))
                return k_all, v_all, mask

            x = block(x, cos, sin, cache_fn)
        return (self._head(x), *present)

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
            "decode_max_abs_diff": decode, "max_abs_diff": max(prefill, decode)}


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
