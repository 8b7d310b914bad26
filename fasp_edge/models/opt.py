"""OPT family (OPTForCausalLM): biases, pre-/post-LN, optional ``word_embed_proj_dim`` projections."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.opt.modeling_opt import eager_attention_forward

from .base import AttentionLayout, ModelFamily
from .blocks import Attention, ExportParts


def _forward_with_value_head_dim(
    self,
    hidden_states: torch.Tensor,
    past_key_values=None,
    attention_mask: Optional[torch.Tensor] = None,
    layer_head_mask: Optional[torch.Tensor] = None,
    output_attentions: bool = False,
    cache_position: Optional[torch.Tensor] = None,
    **kwargs,
):
    """transformers' ``OPTAttention.forward`` (4.57) with the value head dim from ``self.v_head_dim``."""
    bsz, tgt_len, _ = hidden_states.size()
    query_states = self.q_proj(hidden_states) * self.scaling
    query_states = query_states.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
    key_states = self.k_proj(hidden_states).view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(bsz, -1, self.num_heads, self.v_head_dim).transpose(1, 2)

    if past_key_values is not None:
        key_states, value_states = past_key_values.update(
            key_states, value_states, self.layer_idx, {"cache_position": cache_position}
        )

    attention_interface: Callable = eager_attention_forward
    if self.config._attn_implementation != "eager":
        attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]

    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.dropout,
        scaling=1.0,
        **kwargs,
    )
    attn_output = attn_output.reshape(bsz, tgt_len, -1).contiguous()
    attn_output = self.out_proj(attn_output)
    if not output_attentions:
        attn_weights = None
    return attn_output, attn_weights


class OPTFamily(ModelFamily):
    name = "opt"
    model_types = ("opt",)
    attn_out_name = "out_proj"
    value_pruned_forward = staticmethod(_forward_with_value_head_dim)
    ffn_config_key = "ffn_dim"

    def layers(self, model):
        return model.model.decoder.layers

    def mlp_in(self, layer):
        return [layer.fc1]

    def mlp_out(self, layer):
        return layer.fc2

    def set_mlp(self, layer, w1, w2):
        (layer.fc1,) = w1
        layer.fc2 = w2

    def attention_layout(self, layer):
        attn = layer.self_attn
        return AttentionLayout(
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_heads,
            head_dim=attn.head_dim,
            v_head_dim=getattr(attn, "v_head_dim", attn.head_dim),
        )

    def embedding_modules(self, model):
        dec = model.model.decoder
        return [dec.embed_tokens, dec.embed_positions, model.lm_head]

    def export_parts(self, model):
        dec = model.model.decoder
        # transformers' OPTLearnedPositionalEmbedding looks positions up at an offset of 2
        return ExportParts(embed_tokens=dec.embed_tokens, lm_head=model.lm_head, final_norm=dec.final_layer_norm,
                           extra={"project_in": dec.project_in, "project_out": dec.project_out,
                                  "embed_positions": dec.embed_positions,
                                  "position_offset": dec.embed_positions.offset})

    def export_embed(self, decoder, tokens, start, t):
        """Tokens (through ``project_in`` where the model has one) plus the learned positions."""
        x = decoder.embed_tokens(tokens)
        if decoder.project_in is not None:
            x = decoder.project_in(x)
        pos = decoder.embed_positions.weight.narrow(0, start + decoder.position_offset, t)
        return x + pos.unsqueeze(0)

    def export_head_input(self, decoder, x, step):
        """The final LayerNorm (where the model has one), then ``project_out`` (where it has one)."""
        x = super().export_head_input(decoder, x, step)
        return decoder.project_out(x) if decoder.project_out is not None else x

    def export_block(self, layer):
        return OPTBlock(self, layer)


class OPTBlock(nn.Module):
    """OPT block: LayerNorm before (pre-LN) or after (post-LN) each residual, ReLU MLP, learned positions."""

    def __init__(self, family, layer):
        super().__init__()
        self.attn = Attention(layer.self_attn, family, layer, rope=False, q_scale_first=True)
        self.self_attn_layer_norm, self.final_layer_norm = layer.self_attn_layer_norm, layer.final_layer_norm
        (self.fc1,) = family.mlp_in(layer)
        self.fc2 = family.mlp_out(layer)
        self.act = layer.activation_fn
        self.pre_ln = layer.do_layer_norm_before

    def norms(self) -> list[nn.Module]:
        return [self.self_attn_layer_norm, self.final_layer_norm]

    def smoothing_pairs(self) -> list[dict]:
        """Inputs a 4-bit quantizer may rescale for free: a pre-LN norm's Linears, and ``fc2``'s input through
        ``fc1``'s rows where the activation is ReLU (``relu(z / s) = relu(z) / s`` for ``s > 0``)."""
        at, pairs = self.attn, []
        if self.pre_ln:
            pairs += [{"consumers": [at.q_proj, at.k_proj, at.v_proj], "norm": self.self_attn_layer_norm},
                      {"consumers": [self.fc1], "norm": self.final_layer_norm}]
        if isinstance(self.act, nn.ReLU):
            pairs.append({"consumers": [self.fc2], "producer": self.fc1})
        return pairs

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
