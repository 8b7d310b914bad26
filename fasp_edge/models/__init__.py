"""Model families: one descriptor per architecture, holding everything fasp-edge knows about it.

Adding a family means one module here: a :class:`~fasp_edge.models.base.ModelFamily` subclass (the prunable
pairs, the attention layout, the export parts and block, made of :mod:`.blocks`), listed in ``FAMILIES``;
nothing else in fasp-edge branches on the architecture.
"""

from __future__ import annotations

from torch import nn

from ..errors import ModelFamilyNotSupported
from .base import AttentionLayout, ModelFamily, count_embedding_parameters, count_parameters
from .llama import LlamaLikeFamily
from .opt import OPTFamily

FAMILIES: tuple[ModelFamily, ...] = (OPTFamily(), LlamaLikeFamily())

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(config_or_model) -> ModelFamily:
    """The descriptor for a transformers config (or a model carrying one).

    Raises :class:`ModelFamilyNotSupported` naming the supported model types otherwise.
    """
    config = config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ModelFamilyNotSupported(
        f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


__all__ = [
    "AttentionLayout",
    "FAMILIES",
    "ModelFamily",
    "SUPPORTED_MODEL_TYPES",
    "count_embedding_parameters",
    "count_parameters",
    "family_for",
]
