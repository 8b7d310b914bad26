"""ExecuTorch export: ``torch.export`` -> ``to_edge_transform_and_lower`` (XNNPACK) -> ``to_executorch``.

The program has one method, ``forward(tokens [1, T], input_pos [1]) -> logits [1, vocab]`` (the last
position's logits), with the KV cache as internal mutable state, plus the constant metadata methods
ExecuTorch's LLM runner (``TextLLMRunner``, wrapped by Android's ``LlmModule``) reads.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .decoder import ExportDecoder

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "8da4w")
GROUP_SIZE = 32


def runner_metadata(decoder: ExportDecoder, bos_id: int | None, eos_ids: list[int]) -> dict:
    """The constant methods ExecuTorch's LLM runner reads (names from its ``constants.h``)."""
    meta = {
        "get_max_seq_len": decoder.max_context,
        "get_max_context_len": decoder.max_context,
        "get_vocab_size": decoder.vocab_size,
        "get_n_layers": len(decoder.blocks),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
        "get_eos_ids": list(eos_ids),
    }
    if bos_id is not None:
        meta["get_bos_id"] = int(bos_id)
    return meta


def quantize_8da4w(module: nn.Module) -> dict:
    """8-bit dynamic activations, 4-bit weights in groups of 32 (torchao), in place.

    A Linear whose input width is not a multiple of the group size takes 8-bit per-channel weights
    instead. Returns the scheme chosen for each Linear (for the manifest).
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    schemes: dict[str, str] = {}
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear):
            schemes[name] = "8da4w-g32" if mod.in_features % GROUP_SIZE == 0 else "8da8w-per-channel"
    with torch.no_grad():
        quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                weight_granularity=PerGroup(GROUP_SIZE)),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and schemes.get(fqn) == "8da4w-g32")
        quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                                weight_granularity=PerAxis(0)),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and schemes.get(fqn) == "8da8w-per-channel")
    return schemes


class _Forward(nn.Module):
    """``forward(tokens, input_pos)`` with a fixed signature, as ``torch.export`` and the runner want."""

    def __init__(self, decoder: ExportDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, input_pos)


def export_pte(decoder: ExportDecoder, path: str | Path, metadata: dict) -> None:
    """Lower a ``static``-cache decoder to an XNNPACK ``.pte`` at ``path``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if decoder.cache != "static":
        raise ValueError("ExecuTorch export needs a decoder with cache='static'")
    # tracing and lowering warn about internals (SymInt nodes, pytree deprecations) a user cannot act on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder.reset_cache()
        example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0], dtype=torch.long))
        seq = torch.export.Dim("seq", min=1, max=decoder.max_context - 1)
        with torch.no_grad():
            ep = torch.export.export(_Forward(decoder), example, dynamic_shapes=({1: seq}, {0: 1}), strict=False)
            ep = ep.run_decompositions({})
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                           constant_methods=metadata)
        program = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        ))
    with open(path, "wb") as f:
        program.write_to_file(f)


def set_threadpool_size(threads: int) -> None:
    """Size ExecuTorch's process-wide thread pool (XNNPACK runs on it); set it before loading a program."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def threadpool_size() -> int:
    """The size of ExecuTorch's thread pool, as the runtime reports it."""
    from executorch.extension.pybindings import portable_lib

    return int(portable_lib._threadpool_get_thread_count())


class PteModel:
    """A loaded ``.pte`` through ``executorch.runtime``: ``step(tokens, start) -> logits [vocab]``."""

    def __init__(self, path: str | Path):
        from executorch.runtime import Runtime, Verification

        runtime = Runtime.get()
        self.program = runtime.load_program(str(path), verification=Verification.Minimal)
        self.method = self.program.load_method("forward")

    def metadata(self, name: str):
        return self.program.load_method(name).execute([])[0]

    def step(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        out = self.method.execute([tokens.to(torch.long).reshape(1, -1), torch.tensor([start], dtype=torch.long)])
        return out[0].reshape(-1)
