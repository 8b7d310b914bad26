"""ExecuTorch export: ``torch.export`` -> ``to_edge_transform_and_lower`` (XNNPACK) -> ``to_executorch``.

The program has one method, ``forward(tokens [1, T], input_pos [1]) -> logits [1, vocab]`` (the last
position's logits), with the KV cache as internal mutable state, plus the constant metadata methods
ExecuTorch's LLM runner (``TextLLMRunner``, wrapped by Android's ``LlmModule``) reads.

Everything but the token lookup, the cache writes/attention (``llama::update_cache`` /
``llama::custom_sdpa``) and a few slices runs inside XNNPACK delegates (about one per layer). A process
that loads such a program must have the ``llama::`` custom-op kernels and the ``quantized_decomposed``
kernels registered: :class:`PteModel` does it (:func:`load_runtime_ops`); call that before handing a
``.pte`` to ``TextLLMRunner`` in a fresh process.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..models.decoder import ExportDecoder
from ..runtime.executorch import load_runtime_ops

log = logging.getLogger(__name__)


def runner_metadata(decoder: ExportDecoder, bos_id: int | None, eos_ids: list[int]) -> dict:
    """The constant methods ExecuTorch's LLM runner reads (names from its ``constants.h``).

    ``use_sdpa_with_kv_cache``: the static decoder attends with ``llama::custom_sdpa`` over caches written
    by ``llama::update_cache`` (ExecuTorch's own "sdpa with kv cache" export); ``enable_dynamic_shape``: the
    prompt length is a dynamic dimension (prefill in one call).
    """
    meta = {
        "get_max_seq_len": decoder.max_context,
        "get_max_context_len": decoder.max_context,
        "get_vocab_size": decoder.vocab_size,
        "get_n_layers": len(decoder.blocks),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": decoder.cache == "static",
        "enable_dynamic_shape": True,
        "get_eos_ids": list(eos_ids),
    }
    if bos_id is not None:
        meta["get_bos_id"] = int(bos_id)
    return meta


class _Forward(nn.Module):
    """``forward(tokens, input_pos)`` with a fixed signature, as ``torch.export`` and the runner want."""

    def __init__(self, decoder: ExportDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, input_pos)


#: call_function nodes that :func:`delegation_summary` does not count as operators left outside the
#: delegates: the delegates' output unpacking, symbolic-shape bookkeeping and the ``input_pos[0].item()``
#: read (none of them runs a kernel on tensor data)
BOOKKEEPING_OPS = ("getitem", "sym_size", "sym_numel", "sym_stride", "_assert_scalar", "_assert_async",
                   "sym_constrain_range", "sym_constrain_range_for_size", "_local_scalar_dense",
                   "executorch_call_delegate")


def delegation_summary(graph_module) -> dict:
    """Delegate partitions and the operators left outside them, from ExecuTorch's ``get_delegation_info``.

    ``non_delegated_ops`` counts the edge operators outside every delegate (op types as delegation_info
    names them, e.g. ``aten_embedding_default``; ``llama::update_cache``, wrapped in
    ``auto_functionalized_v2`` until ``to_executorch``, as ``llama_update_cache``). Nodes that only unpack
    delegate outputs or do symbolic-shape bookkeeping are counted apart, in ``excluded_bookkeeping``.
    """
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    outside: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for name, rec in info.delegation_by_operator.items():
        if not rec.non_delegated or name == "auto_functionalized_v2":
            continue
        (skipped if _is_bookkeeping(name) else outside)[name] = rec.non_delegated
    # in-place custom ops (llama::update_cache) show up wrapped as auto_functionalized_v2; name what they wrap
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and "auto_functionalized" in str(node.target) and node.args:
            name = str(getattr(node.args[0], "_name", node.args[0])).replace("::", "_").replace(".", "_")
            outside[name] = outside.get(name, 0) + 1
    return {"delegate_partitions": info.num_delegated_subgraphs,
            "delegated_nodes": info.num_delegated_nodes,
            "non_delegated_ops": dict(sorted(outside.items())),
            "non_delegated_op_count": sum(outside.values()),
            "excluded_bookkeeping": dict(sorted(skipped.items()))}


def _is_bookkeeping(op_type: str) -> bool:
    base = op_type.removeprefix("aten_").removeprefix("torch_ops_aten_")
    return any(base == b or base.startswith(b + "_") for b in BOOKKEEPING_OPS) or base in _SYMBOLIC_OPERATORS


#: python operators on SymInts (``start + t <= max_context`` checks) appear as plain call_function nodes
_SYMBOLIC_OPERATORS = {"add", "sub", "mul", "floordiv", "mod", "neg", "eq", "ne", "lt", "le", "gt", "ge",
                       "and_", "or_", "not_", "truediv", "pow", "sym_max", "sym_min", "sym_not", "sym_float",
                       "sym_int", "sym_ite"}


#: the XNNPACK graph passes our decoders need; XNNPACK's ``preprocess`` runs 17 over every partition, each a full
#: re-trace under fake tensors (SmolLM2 cut to 4 layers, 2 cores: the 8da4w lowering takes 46-48 s with all 17,
#: 34-35 s with these 5; fp32 13.9 s and 10.3-11.3 s; the same files, bit-identical logits). Over SmolLM2 and OPT
#: decoders (fp32 and 8da4w) only these changed a graph or its metadata: dim-order copies reverted, Linear
#: conversion, the external-constant tags (``PropagateCustomMetaPass``: without it XNNPACK's weights stay inside the
#: .pte, out of model.ptd), ReLU fused into its Linear (OPT); clone removal is kept for clones a model may emit. The
#: other 12 rewrite ops our decoders never emit (batch norm, conv, pooling, upsampling, SDPA patterns, PReLU, large
#: concatenations, channels-last layouts); an unhandled op would fail the export, not run slower.
XNNPACK_PASSES = ("XNNPACKRemoveCloneOpsTransform", "DimOrderOpsRevertPass", "ConvertToLinearPass",
                  "PropagateCustomMetaPass", "FuseActivationPass")


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    """Within the block, ``owner.name`` is ``value``; the original is put back however the block ends."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def _lean_xnnpack_passes():
    """Within the block, XNNPACK's ``preprocess`` runs only :data:`XNNPACK_PASSES` (executorch 1.4.1's pass manager
    has no public option for its pass list; if a later version lacks one of them, its full list runs)."""
    from executorch.backends.xnnpack import xnnpack_preprocess
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    default = XNNPACKPassManager(None).passes
    lean = [p for p in default if p.__name__ in XNNPACK_PASSES]
    if len(lean) != len(XNNPACK_PASSES) or xnnpack_preprocess.XNNPACKPassManager is not XNNPACKPassManager:
        yield
        return

    class LeanPassManager(XNNPACKPassManager):
        def __init__(self, exported_program, passes=None):
            super().__init__(exported_program, passes=passes or lean)

    with _replaced(xnnpack_preprocess, "XNNPACKPassManager", LeanPassManager):
        yield


@contextlib.contextmanager
def _one_decomposition_pass():
    """Within the block, ``to_edge_transform_and_lower`` decomposes the exported program once, not three times.

    executorch 1.4.1's ``_gen_edge_manager_for_partitioners`` runs ``run_decompositions`` three times for a
    partitioner that filters the ops it keeps undecomposed (XNNPACK's does): once to functionalize, once with
    the kept ops out of the table, then, after renaming the kept nodes its filter accepts, once more with the
    whole table. Each pass re-traces every node under fake tensors. When the filter accepts every node of the kept
    ops, as it does for our decoders, the three passes produce what one pass with those ops out of the table does
    (the same .pte and .ptd bytes; ``benchmarks/lowering.py``, dense SmolLM2 8da4w: decompositions 45.8 s -> 14.5 s,
    lowering 147.1 s -> 105.6 s).
    Otherwise, or if the internals it uses are missing, ExecuTorch's own path runs.
    """
    from executorch.exir.program import _program

    stock = getattr(_program, "_gen_edge_manager_for_partitioners", None)
    needed = ("_default_decomposition_table", "_generate_edge_program", "_remove_invalid_ops_for_not_decompose",
              "EdgeProgramManager")
    if stock is None or not all(hasattr(_program, n) for n in needed):
        yield
        return

    def one_pass(partitioner, aten_programs, config, constant_methods, generate_etrecord=False):
        if generate_etrecord or partitioner is None or any(len(partitioner.get(n, [])) != 1 for n in aten_programs):
            return stock(partitioner, aten_programs, config, constant_methods, generate_etrecord)
        edge, kept = {}, set()
        for name, program in aten_programs.items():
            (part,) = partitioner[name]
            ops, check = part.ops_to_not_decompose(program)
            if check is not None:
                ops = _program._remove_invalid_ops_for_not_decompose(ops)
            table = _program._default_decomposition_table()
            keep = [op for op in ops if table.pop(op, None) is not None]
            decomposed = program.run_decompositions(table)
            if check is not None and not all(check(node) for node in decomposed.graph.nodes
                                             if node.op == "call_function" and node.target in keep):
                return stock(partitioner, aten_programs, config, constant_methods, generate_etrecord)
            edge[name] = _program._generate_edge_program(config, decomposed, preserve_ops=keep)
            kept.update(keep)
        config._core_aten_ops_exception_list = list(set(config._core_aten_ops_exception_list) | kept)
        return _program.EdgeProgramManager(edge, constant_methods, config, list(kept))

    with _replaced(_program, "_gen_edge_manager_for_partitioners", one_pass):
        yield


def _python_scalar_at_tensor_argument(node) -> bool:
    """``ScalarToTensorPass`` rewrites a node only where a Python number stands for a Tensor argument."""
    return any(isinstance(value, (bool, int, float)) for value, arg in _schema_arguments(node)
               if isinstance(arg.type, torch.TensorType))


def _symbol_at_tensor_argument(node) -> bool:
    """``SymToTensorPass`` rewrites a node only where a SymInt/SymFloat/SymBool stands for a Tensor argument."""
    return any(isinstance(value, torch.fx.Node) and isinstance(value.meta.get("val"), (torch.SymInt, torch.SymFloat,
                                                                                       torch.SymBool))
               for value, arg in _schema_arguments(node) if isinstance(arg.type, torch.TensorType))


_PROMOTING_OPS = {torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor, torch.ops.aten.sub.Tensor,
                  torch.ops.aten.div.Tensor, torch.ops.aten.div.Tensor_mode, torch.ops.aten.minimum.default}


def _mixed_dtype_operands(node) -> bool:
    """``RemoveMixedTypeOperators`` casts a Tensor argument of add/mul/sub/div/minimum whose dtype differs from the
    promoted one (the result's); with every Tensor argument a tensor of the result's dtype (or a symbol, which it
    leaves alone) it changes nothing."""
    if node.target not in _PROMOTING_OPS or len(node.args) <= 1:
        return False
    out = node.meta.get("val")
    for value, arg in _schema_arguments(node):
        if not isinstance(arg.type, torch.TensorType):
            continue
        val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            continue  # a symbol it leaves as it is
        if not isinstance(out, torch.Tensor) or not isinstance(val, torch.Tensor) or val.dtype != out.dtype:
            return True
    return False


def _schema_arguments(node) -> list:
    """(value, schema argument) pairs of a node's arguments, as ExecuTorch's ``map_args`` hands them to the passes."""
    from executorch.exir.pass_base import map_args

    pairs = []
    map_args(node.target, lambda value, arg: pairs.append((value, arg)) or value, tuple(node.args), dict(node.kwargs))
    return pairs


# ExecuTorch's edge passes that re-trace the whole program to rewrite a few kinds of node (each 4-6 s of a SmolLM2
# 8da4w lowering), and the nodes they rewrite (read from executorch 1.4.1's passes; any other node they re-trace
# unchanged)
_EDGE_PASS_TARGETS = {
    "NormalizeTransposePass": lambda node: node.target == torch.ops.aten.t.default,
    "ReplaceBrokenOpsWithFunctionalOpsPass": lambda node: node.target.is_view,
    "ScalarToTensorPass": _python_scalar_at_tensor_argument,
    "SymToTensorPass": _symbol_at_tensor_argument,
    "RemoveMixedTypeOperators": _mixed_dtype_operands,
}


class _IfAnyNodeApplies:
    """An edge pass that runs only on a graph holding a node it rewrites (or a node this cannot judge)."""

    def __init__(self, edge_pass, applies):
        self.edge_pass, self.applies = edge_pass, applies

    def __call__(self, gm):
        from executorch.exir.pass_base import PassResult

        def applies(node) -> bool:
            if node.op == "get_attr" and isinstance(getattr(gm, str(node.target), None), torch.fx.GraphModule):
                return True  # control flow: its subgraphs are the pass's to judge
            if node.op != "call_function":
                return False
            if isinstance(node.target, torch._ops.OpOverloadPacket):
                return True
            # ExportPass hands only operator overloads to these passes' call_operator (getitem, symbolic
            # arithmetic and higher-order ops such as auto_functionalized_v2 it re-traces as they are)
            return isinstance(node.target, torch._ops.OpOverload) and self.applies(node)

        if any(applies(node) for node in gm.graph.nodes):
            return self.edge_pass(gm)
        return PassResult(gm, False)


@contextlib.contextmanager
def _applicable_edge_passes():
    """Within the block, ExecuTorch's edge passes of :data:`_EDGE_PASS_TARGETS` run only on a graph holding a node
    they rewrite. SmolLM2 holds nodes for ScalarToTensorPass only (RMSNorm's ``+ eps``): the other four are skipped
    (``benchmarks/lowering.py``, dense 8da4w: edge program 36.5 s -> 19.9 s, lowering 105.6 s -> 89.1 s; the same
    .pte and .ptd bytes)."""
    from executorch.exir.program import _program

    stock = getattr(_program, "_get_aten_to_edge_passes", None)
    if stock is None:
        yield
        return

    def name(edge_pass) -> str:  # ExecuTorch's pass manager wraps the pass objects in functions
        return type(getattr(edge_pass, "__wrapped__", edge_pass)).__name__

    def gated(config):
        pre, post = stock(config)
        return [_IfAnyNodeApplies(p, _EDGE_PASS_TARGETS[name(p)]) if name(p) in _EDGE_PASS_TARGETS else p
                for p in pre], post

    with _replaced(_program, "_get_aten_to_edge_passes", gated):
        yield


def _tag_delegate_constants(ep, tag: str) -> None:
    """Tag every weight and constant of ``ep`` (not the mutable KV cache) for the delegate's external data
    ``tag``: the ``delegate_constant_tag`` that ExecuTorch's ``delegate_external_constants_pass_unlifted`` puts
    on an unlifted module's ``get_attr`` nodes, put on the lifted program's placeholders, which saves tracing
    the model a second time (the same .pte and .ptd bytes)."""
    sig = ep.graph_signature
    constants = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    mutated = set(sig.buffers_to_mutate.values())
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in constants and constants[node.name] not in mutated:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag


def export_pte(decoder: ExportDecoder, path: str | Path, metadata: dict, *, data_file: str | None = None) -> dict:
    """Lower a ``static``-cache decoder to an XNNPACK ``.pte`` at ``path``; returns what the lowering did.

    ``data_file`` (a file name, e.g. ``"model.ptd"``) moves every constant, the XNNPACK weights included,
    into that one file beside the ``.pte``; identical tensors (a tied embedding and LM head in fp32) are
    stored once. Load it with ``PteModel(path, data_path=...)`` or ``TextLLMRunner(pte, tokenizer, ptd)``.

    The returned dict has ``delegate_partitions``, ``delegated_nodes``, ``non_delegated_ops`` (edge operator
    -> count outside the delegates, without the bookkeeping nodes in :data:`BOOKKEEPING_OPS`),
    ``runtime_operators`` (the non-delegate kernels the final program calls), ``lowering_seconds`` (export,
    lowering and serialisation) and ``files`` (name -> bytes).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if decoder.cache != "static":
        raise ValueError("ExecuTorch export needs a decoder with cache='static'")
    if data_file is not None and (Path(data_file).name != data_file or not data_file.endswith(".ptd")):
        raise ValueError(f"data_file must be a plain file name ending in .ptd, got {data_file!r}")
    load_runtime_ops()
    path = Path(path)
    tag = Path(data_file).stem if data_file else None
    t0 = time.perf_counter()
    # tracing and lowering warn about internals (SymInt nodes, pytree deprecations) a user cannot act on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder.reset_cache()
        example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0], dtype=torch.long))
        seq = torch.export.Dim("seq", min=1, max=decoder.max_context - 1)
        shapes = ({1: seq}, None)
        with torch.no_grad():
            ep = torch.export.export(_Forward(decoder), example, dynamic_shapes=shapes, strict=False)
        if tag is not None:
            _tag_delegate_constants(ep, tag)
        with _lean_xnnpack_passes(), _one_decomposition_pass(), _applicable_edge_passes():
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                               compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                               constant_methods=metadata)
        summary = delegation_summary(edge.exported_program().graph_module)
        program = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            # a torchao-quantized nn.Embedding becomes quantized_decomposed::embedding_byte/4bit
            do_quant_fusion_and_const_prop=True,
            external_constants=(lambda node: tag) if tag is not None else False,
        ))
    with open(path, "wb") as f:
        program.write_to_file(f)
    files = {path.name: path.stat().st_size}
    if tag is not None:
        program.write_tensor_data_to_file(str(path.parent))
        written = path.parent / f"{tag}.ptd"
        if not written.is_file():
            raise RuntimeError(f"ExecuTorch wrote no {written.name}; constants: {sorted(program._tensor_data)}")
        files[written.name] = written.stat().st_size
    forward = next(plan for plan in program.executorch_program.execution_plan if plan.name == "forward")
    # the kernels the runtime must provide besides the delegate (after quant fusion and out-variant passes)
    summary["runtime_operators"] = sorted({f"{op.name}.{op.overload}" if op.overload else op.name
                                           for op in forward.operators})
    summary["lowering_seconds"] = round(time.perf_counter() - t0, 2)
    summary["files"] = files
    return summary
