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

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidArgument
from . import family_for
from .blocks import VALUE_PAD_MODES, Attention, LayerDims, is_rms_norm, load_custom_ops, rotate_half_matrix


#: how the ``io`` mode computes attention (see :class:`ExportDecoder`)
ATTENTION_MODES = ("decomposed", "fused")


class _IOStep:
    """One forward of the ``io`` mode: the source norms, HF-style RoPE, past/present tensors."""

    def __init__(self, cos, sin, cache_fns, fused: bool = False):
        self.cos, self.sin, self.cache_fns, self.fused = cos, sin, cache_fns, fused

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def attention(self, attn: Attention, x: torch.Tensor, i: int) -> torch.Tensor:
        q, k, v = attn.project(x, self.cos, self.sin)
        k_all, v_all, mask = self.cache_fns[i](k, v)
        return attn.finish(q, k_all, v_all, mask, self.fused)


class _StaticStep:
    """One forward of the ``static`` mode: delegable RMSNorm and RoPE, ``llama::`` cache and attention ops."""

    def __init__(self, decoder: "ExportDecoder", start, rope):
        self.decoder, self.start, self.rope = decoder, start, rope
        self.use_ops = decoder.eager_custom_ops or torch.compiler.is_exporting()
        if self.use_ops:
            load_custom_ops()

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not is_rms_norm(module):
            return module(x)
        # mean(x²) as a linear with a constant 1/D row: XNNPACK keeps it (mean.dim on rank 3 it does not)
        avg = getattr(self.decoder, f"rms_avg_{module.weight.shape[0]}")
        return x * torch.rsqrt(F.linear(x * x, avg) + float(module.variance_epsilon)) * module.weight

    def attention(self, attn: Attention, x: torch.Tensor, i: int) -> torch.Tensor:
        d = self.decoder
        return attn.attend_static(x, self.rope, getattr(d, f"k_cache_{i}"), getattr(d, f"v_cache_{i}"), self.start,
                                  self.use_ops)


class ExportDecoder(nn.Module):
    """Export-ready decoder over a supported HF causal LM (see the module docstring for the modes).

    ``value_pad`` (static mode, pruned value heads only) is one of :data:`VALUE_PAD_MODES`. ``attention`` (io mode)
    is one of :data:`ATTENTION_MODES`: ``decomposed`` (matmuls and a softmax, grouped heads without copies) or
    ``fused`` (``scaled_dot_product_attention``, which the ONNX exporter writes as opset 23's ``Attention`` op).
    """

    def __init__(self, model: nn.Module, *, max_context: int, cache: str = "static", full_logits: bool = False,
                 value_pad: str = "select", attention: str = "decomposed"):
        super().__init__()
        if cache not in ("static", "io"):
            raise ValueError(f"cache must be 'static' or 'io', got {cache!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
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
        self.attention = attention
        self.vocab_size = cfg.vocab_size
        layers = family.layers(model)
        parts = family.export_parts(model)
        self.blocks = nn.ModuleList([family.export_block(layer) for layer in layers])
        self.family = family  # its export_embed / export_head_input run the family's own parts
        self.embed_tokens = parts.embed_tokens
        for name, value in parts.extra.items():  # family-specific modules and constants, kept under their names
            setattr(self, name, value)
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
                self.register_buffer("rope_rot", rotate_half_matrix(emb.shape[-1]), persistent=False)
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
            for size in sorted({n.weight.shape[0] for n in norms if is_rms_norm(n)}):
                self.register_buffer(f"rms_avg_{size}", torch.full((1, size), 1.0 / size), persistent=False)
            for i, (d, block) in enumerate(zip(self.dims, self.blocks)):
                block.attn.setup_static(value_pad)
                # key and value caches of one shape (custom_sdpa needs it): a pruned value head is padded
                shape = (1, max_context, d.num_kv_heads, d.head_dim)
                self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
                self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    # ---------------------------------------------------------------------------------------------
    def _embed(self, tokens: torch.Tensor, start, t: int) -> torch.Tensor:
        return self.family.export_embed(self, tokens, start, t)

    def _rope(self, start, t: int):  # io mode: [1, 1, T, D] tables
        if not self.rope:
            return None, None
        return self.rope_cos.narrow(0, start, t)[None, None], self.rope_sin.narrow(0, start, t)[None, None]

    def _head_input(self, x: torch.Tensor, step) -> torch.Tensor:
        """What the LM head reads: the last block's output as the family prepares it (final norm, projections)."""
        return self.family.export_head_input(self, x, step)

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
        step = _IOStep(cos, sin, cache_fns, fused=self.attention == "fused")
        for i, block in enumerate(self.blocks):
            x = block(x, step, i)
        return (self._head(x, step), *present)

    def stepper(self):
        """``step(tokens, start) -> logits`` over this decoder run eagerly, either cache mode; ``start == 0`` begins
        a new sequence. Logits are ``[V]``, or ``[T, V]`` with ``full_logits``."""
        if self.cache == "static":
            def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
                if start == 0:
                    self.reset_cache()
                return self(tokens.reshape(1, -1), torch.tensor([start]))[0]

            return step
        past: list[torch.Tensor] = []

        def step_io(tokens: torch.Tensor, start: int) -> torch.Tensor:
            nonlocal past
            if start == 0:
                past = self.empty_past()
            res = self(tokens.reshape(1, -1), *past)
            past = list(res[1:])
            return res[0][0]

        return step_io

    def empty_past(self, length: int = 0) -> list[torch.Tensor]:
        """Zero past key/value tensors of ``length`` positions for the ``io`` mode."""
        out = []
        for d in self.dims:
            out += [torch.zeros(1, d.num_kv_heads, length, d.head_dim), torch.zeros(1, d.num_kv_heads, length, d.v_head_dim)]
        return out


def run_decoder(decoder: ExportDecoder, seq: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    """Logits of a prefill of ``prefill`` tokens then one step per remaining token (``[T, V]`` each)."""
    step = decoder.stepper()
    out = [step(seq[:, :prefill], 0)] + [step(seq[:, i : i + 1], i) for i in range(prefill, seq.shape[1])]
    return [o.reshape(-1, decoder.vocab_size) for o in out]  # [T, V], or [1, V] for last-token logits
