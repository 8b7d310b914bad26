"""What a model family must describe so the rest of fasp-edge never asks "which architecture?".

A family descriptor names, for one decoder layer, the two prunable pairs ``y = W2 · f(W1 · x)``:

* MLP: ``W1`` is one or more Linear maps whose output rows are removed together (``fc1``, or
  ``gate_proj`` and ``up_proj``), ``W2`` the Linear whose input columns are removed (``fc2`` /
  ``down_proj``).
* Attention: ``W1`` = ``v_proj``, ``W2`` = ``o_proj``/``out_proj``; Q and K are never touched.

It also says how the attention module runs with a value head dim smaller than the Q/K head dim,
where the FFN width lives in the config, and which modules are embeddings (for the parameter counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionLayout:
    """Head geometry of one attention module.

    ``num_heads`` query heads share ``num_kv_heads`` key/value heads (query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)``, as transformers' ``repeat_kv`` does). ``head_dim`` is the
    Q/K head dim; ``v_head_dim`` the (possibly pruned) value head dim.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


class ModelFamily:
    """Descriptor of one architecture family. Subclasses fill in every method."""

    #: short name shown to users
    name: str = ""
    #: ``config.model_type`` values this descriptor handles
    model_types: tuple[str, ...] = ()
    #: config key holding the FFN (intermediate) width
    ffn_config_key: str = ""
    #: attribute name of the attention output projection (``W2`` of the attention pair)
    attn_out_name: str = "o_proj"
    #: the attention forward used once the value head dim differs from the Q/K head dim
    value_pruned_forward = None

    # --- structure -------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def mlp_in(self, layer: nn.Module) -> list[nn.Linear]:
        """The Linear maps whose output rows are removed with an FFN channel."""
        raise NotImplementedError

    def mlp_out(self, layer: nn.Module) -> nn.Linear:
        """The Linear whose input columns are the FFN channels."""
        raise NotImplementedError

    def set_mlp(self, layer: nn.Module, w1: list[nn.Linear], w2: nn.Linear) -> None:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def attn_in(self, layer: nn.Module) -> nn.Linear:
        return self.attention(layer).v_proj

    def attn_out(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.attention(layer), self.attn_out_name)

    def set_attn(self, layer: nn.Module, v_proj: nn.Linear, o_proj: nn.Linear, v_head_dim: int) -> None:
        """Install smaller ``v_proj``/``o_proj`` and make the attention run with ``v_head_dim``."""
        attn = self.attention(layer)
        attn.v_proj = v_proj
        setattr(attn, self.attn_out_name, o_proj)
        attn.v_head_dim = v_head_dim
        if v_head_dim != attn.head_dim:
            attn.__class__ = value_pruned_class(type(attn), type(self).value_pruned_forward)

    def attention_layout(self, layer: nn.Module) -> AttentionLayout:
        raise NotImplementedError

    def embedding_modules(self, model: nn.Module) -> list[nn.Module]:
        """Token/position embedding tables and the LM head (counted apart from the rest)."""
        raise NotImplementedError

    # --- export (the family's whole export lives in its own module: parts, block, embedding, head input) ---
    def export_parts(self, model: nn.Module):
        """The whole-model pieces (:class:`~fasp_edge.models.blocks.ExportParts`) for
        :class:`~fasp_edge.models.decoder.ExportDecoder`: token embedding, final norm, LM head, rotary, and any
        family-specific modules its :meth:`export_embed` / :meth:`export_head_input` read."""
        raise NotImplementedError

    def export_block(self, layer: nn.Module) -> nn.Module:
        """One export-friendly block re-using ``layer``'s weight modules (written in the family's module, from
        :mod:`fasp_edge.models.blocks`; it runs in both cache modes through ``step.norm`` / ``step.attention``)."""
        raise NotImplementedError

    def export_embed(self, decoder: nn.Module, tokens: torch.Tensor, start, t: int) -> torch.Tensor:
        """The first block's input for ``tokens [1, T]`` at positions ``start..start+T-1`` (default: the token
        embedding alone; a family with learned positions or an input projection adds them here)."""
        return decoder.embed_tokens(tokens)

    def export_head_input(self, decoder: nn.Module, x: torch.Tensor, step) -> torch.Tensor:
        """What the LM head reads from the last block's output ``x`` (default: ``x`` through the final norm)."""
        return step.norm(decoder.final_norm, x) if decoder.final_norm is not None else x

    # --- derived helpers shared by all families -------------------------------------------
    def ffn_dim(self, layer: nn.Module) -> int:
        return self.mlp_out(layer).in_features

    def ffn_dims(self, model: nn.Module) -> list[int]:
        return [self.ffn_dim(layer) for layer in self.layers(model)]

    def v_head_dims(self, model: nn.Module) -> list[int]:
        return [self.attention_layout(layer).v_head_dim for layer in self.layers(model)]

    def head_dim(self, model: nn.Module) -> int:
        return self.attention_layout(self.layers(model)[0]).head_dim


def empty_linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    """A Linear of the given shape with uninitialised weights on ``like``'s device and dtype."""
    lin = nn.Linear(in_features, out_features, bias=bias, device="meta")
    lin.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=like.weight.dtype,
                                          device=like.weight.device))
    if bias:
        lin.bias = nn.Parameter(torch.empty(out_features, dtype=like.weight.dtype,
                                            device=like.weight.device))
    return lin


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, counting tied tensors once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen and p.device.type != "meta":
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def count_embedding_parameters(family: ModelFamily, model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for mod in family.embedding_modules(model):
        for p in mod.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel()
    return total


_VALUE_PRUNED_CLASSES: dict[type, type] = {}


def value_pruned_class(cls: type, forward) -> type:
    """A subclass of attention class ``cls`` whose ``forward`` honours ``self.v_head_dim``.

    Made once per class, so ``isinstance`` checks against the transformers class still hold.
    """
    if getattr(cls, "_fasp_value_pruned", False):
        return cls
    if cls not in _VALUE_PRUNED_CLASSES:
        _VALUE_PRUNED_CLASSES[cls] = type(f"ValuePruned{cls.__name__}", (cls,),
                                          {"forward": forward, "_fasp_value_pruned": True})
    return _VALUE_PRUNED_CLASSES[cls]


def reshape_layer(family: ModelFamily, layer: nn.Module, ffn_dim: int, v_head_dim: int) -> None:
    """Give ``layer`` empty Linear maps of a pruned checkpoint's shapes, ready for ``load_state_dict``."""
    w2 = family.mlp_out(layer)
    if ffn_dim != w2.in_features:
        w1 = [empty_linear(m.in_features, ffn_dim, m.bias is not None, m) for m in family.mlp_in(layer)]
        family.set_mlp(layer, w1, empty_linear(ffn_dim, w2.out_features, w2.bias is not None, w2))
    lay = family.attention_layout(layer)
    if v_head_dim != lay.v_head_dim:
        v, o = family.attn_in(layer), family.attn_out(layer)
        family.set_attn(layer,
                        empty_linear(v.in_features, lay.num_kv_heads * v_head_dim, v.bias is not None, v),
                        empty_linear(lay.num_heads * v_head_dim, o.out_features, o.bias is not None, o),
                        v_head_dim)
