"""LLaMA-like family: LLaMA 1/2/3, Mistral, Qwen2, SmolLM (RMSNorm, SwiGLU, RoPE, GQA)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .base import AttentionLayout, ModelFamily
from .blocks import Attention, ExportParts


def _forward_with_value_head_dim(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    past_key_values=None,
    cache_position: Optional[torch.LongTensor] = None,
    **kwargs,
):
    """transformers' LLaMA attention with the value head dim taken from ``self.v_head_dim``.

    Identical to ``LlamaAttention.forward`` (transformers 4.57) except for the value reshape; the
    Mistral/Qwen2 sliding window is passed on as their own forwards do.
    """
    input_shape = hidden_states.shape[:-1]
    query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
    key_states = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(*input_shape, -1, self.v_head_dim).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

    if past_key_values is not None:
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx, cache_kwargs)

    attention_interface: Callable = eager_attention_forward
    if self.config._attn_implementation != "eager":
        attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]

    sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    if sliding_window is not None:
        kwargs["sliding_window"] = sliding_window
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


class LlamaLikeFamily(ModelFamily):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    attn_out_name = "o_proj"
    value_pruned_forward = staticmethod(_forward_with_value_head_dim)
    ffn_config_key = "intermediate_size"

    def layers(self, model):
        return model.model.layers

    def mlp_in(self, layer):
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def mlp_out(self, layer):
        return layer.mlp.down_proj

    def set_mlp(self, layer, w1, w2):
        layer.mlp.gate_proj, layer.mlp.up_proj = w1
        layer.mlp.down_proj = w2
        layer.mlp.intermediate_size = w2.in_features

    def attention_layout(self, layer):
        attn = layer.self_attn
        cfg = attn.config
        return AttentionLayout(
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=attn.head_dim,
            v_head_dim=getattr(attn, "v_head_dim", attn.head_dim),
        )

    def embedding_modules(self, model):
        return [model.model.embed_tokens, model.lm_head]

    def export_parts(self, model):
        return ExportParts(embed_tokens=model.model.embed_tokens, lm_head=model.lm_head, final_norm=model.model.norm,
                           rotary=model.model.rotary_emb)

    def export_block(self, layer):
        return PreNormGatedBlock(self, layer)


class PreNormGatedBlock(nn.Module):
    """LLaMA-like block: RMSNorm, RoPE attention, gated (SwiGLU) MLP, pre-norm residuals."""

    def __init__(self, family, layer):
        super().__init__()
        self.attn = Attention(layer.self_attn, family, layer, rope=True, q_scale_first=False)
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.gate_proj, self.up_proj = family.mlp_in(layer)
        self.down_proj = family.mlp_out(layer)
        self.act = layer.mlp.act_fn

    def norms(self) -> list[nn.Module]:
        return [self.input_layernorm, self.post_attention_layernorm]

    def smoothing_pairs(self) -> list[dict]:
        """Inputs a 4-bit quantizer may rescale for free: each norm's Linears, and ``down_proj``'s input through
        ``up_proj``'s rows (the gate multiplies it linearly)."""
        at = self.attn
        return [{"consumers": [at.q_proj, at.k_proj, at.v_proj], "norm": self.input_layernorm},
                {"consumers": [self.gate_proj, self.up_proj], "norm": self.post_attention_layernorm},
                {"consumers": [self.down_proj], "producer": self.up_proj}]

    def forward(self, x, step, i: int):
        x = x + step.attention(self.attn, step.norm(self.input_layernorm, x), i)
        h = step.norm(self.post_attention_layernorm, x)
        return x + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))
