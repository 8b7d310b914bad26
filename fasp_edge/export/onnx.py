"""ONNX export with explicit KV-cache inputs and outputs (run by :class:`fasp_edge.runtime.onnx.OnnxModel`).

Graph interface (batch 1):

* inputs: ``input_ids [1, T]`` int64, then per layer ``past_key_values.{i}.key [1, kv_heads, P, head_dim]``
  and ``past_key_values.{i}.value [1, kv_heads, P, v_head_dim]`` (P = 0 on the first call);
* outputs: ``logits [1, vocab]`` (last position), then ``present.{i}.key`` / ``present.{i}.value``
  (``P + T`` positions) to feed back as the next call's past.

The KV cache is ``[batch, kv_heads, positions, head_dim]`` (BNSH), grown by the graph itself: a pruned layer's
value head dim is its own (``v_head_dim`` below ``head_dim``). ``--quant 4bit`` (:func:`export_onnx_4bit`) writes
the Linears as ONNX Runtime's ``MatMulNBits`` and the token embedding as ``GatherBlockQuantized`` (contrib ops,
domain ``com.microsoft``); the interface is the same.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.decoder import ExportDecoder
from ..runtime.onnx import io_names
from .quantize import BlockQuantLinear, BlockRecipe, minmax_blocks, quantize_blockwise

log = logging.getLogger(__name__)


class _Forward(nn.Module):
    """Flat positional signature for the exporter: ``forward(input_ids, *past)``."""

    def __init__(self, decoder: ExportDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]):
        return self.decoder(input_ids, *past)


#: the ONNX opset of a graph whose attention is fused (``Attention`` is an opset-23 op); others keep the exporter's
FUSED_ATTENTION_OPSET = 23
#: the attention of each kind of exported ONNX graph, by ``--quant`` (:data:`~fasp_edge.models.decoder.ATTENTION_MODES`),
#: fused where it was measured faster (``benchmarks/onnx_attention.py``, dense SmolLM2, 2 threads, 7 rounds interleaved
#: in one process, ``benchmarks/results/onnx-attention.md``): opset 23's ``Attention`` op, one node per layer where the
#: decomposed form has ~10 (``RMSNormalization`` comes with the opset), decodes the 4-bit graph (k/v 8-bit there)
#: 1.037x faster (median of per-round ratios) and the fp32 graph 0.977x: the fp32 graph keeps the decomposed form (and
#: the exporter's default opset, 20, which ONNX Runtime before 1.23 reads), and so does the int8 one (not measured).
ONNX_ATTENTION = {"none": "decomposed", "int8": "decomposed", "4bit": "fused"}


def export_onnx(decoder: ExportDecoder, path: str | Path) -> None:
    """Export an ``io``-cache decoder to ``path`` (weights in ``path + '.data'``), then check it."""
    import onnx

    if decoder.cache != "io":
        raise ValueError("ONNX export needs a decoder with cache='io'")
    path = Path(path)
    n = len(decoder.blocks)
    inputs, outputs = io_names(n)
    seq = torch.export.Dim("seq", min=1, max=decoder.max_context)
    past_len = torch.export.Dim("past", min=0, max=decoder.max_context)
    example = (torch.zeros(1, 3, dtype=torch.long), decoder.empty_past(2))
    dynamic = ({1: seq}, [{2: past_len} for _ in range(2 * n)])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_Forward(decoder), example, dynamo=True, dynamic_shapes=dynamic,
                                 input_names=inputs, output_names=outputs, external_data=True,
                                 opset_version=FUSED_ATTENTION_OPSET if decoder.attention == "fused" else None,
                                 optimize=True, verbose=False, report=False)
        prog.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=False)


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """Dynamic int8 weight quantization of the MatMul weights (ONNX Runtime's ``quantize_dynamic``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, use_external_data_format=True)


# ---------------------------------------------------------------------------------------------- 4-bit
def kv_cache_layout(decoder: ExportDecoder) -> dict:
    """The KV-cache contract of the graph, for the manifest (what an app feeds back as the next call's past)."""
    return {"layout": "BNSH", "key": "[1, kv_heads, positions, head_dim]",
            "value": "[1, kv_heads, positions, v_head_dim]", "grows": "present = past + the call's tokens",
            "dtype": "float32",
            "attention": f"fused (opset {FUSED_ATTENTION_OPSET} Attention)" if decoder.attention == "fused"
            else "decomposed (MatMul, Softmax)"}


@torch.no_grad()
def export_onnx_4bit(model: nn.Module, path: str | Path, *, max_context: int, recipe: BlockRecipe,
                     calibration: torch.Tensor | None = None, progress: bool = False,
                     attention: str = ONNX_ATTENTION["4bit"], in_place: bool = False) -> tuple[dict, nn.Module]:
    """Export ``model`` to ``path`` with 4-bit ``MatMulNBits`` weights (``recipe``; :func:`quantize_blockwise`).

    The Linears are quantized on a static-cache decoder over a copy of ``model`` (its calibration runs block by
    block); their dequantized weights are written back into the copy, which is exported as an fp32 graph and
    rewritten: every ``MatMul`` / ``Gemm`` reading one of those weights becomes a ``MatMulNBits`` holding the
    integers, and the token embedding's ``Gather`` a ``GatherBlockQuantized`` (a tied table reads the LM head's
    blocks; an untied one gets its own 4-bit min/max blocks). Returns what the manifest records of the
    quantization and the dequantized copy of ``model`` (smoothing folded in): the reference computation the graph
    is checked against. ``in_place``: quantize ``model`` itself instead of a copy (it then is that dequantized
    model).
    """
    path = Path(path)
    src = (model if in_place else copy.deepcopy(model)).eval()
    static = ExportDecoder(src, max_context=max_context, cache="static").eval()
    originals = dict(static.named_modules())
    emb = static.embed_tokens
    tied = isinstance(emb, nn.Embedding) and getattr(originals.get("lm_head"), "weight", None) is emb.weight
    info = quantize_blockwise(static, recipe, calibration, progress)
    quantized = {f: m for f, m in static.named_modules() if isinstance(m, BlockQuantLinear)}
    for fqn, mod in quantized.items():
        originals[fqn].weight.copy_(mod.dequantized())
    table = None
    if isinstance(emb, nn.Embedding) and emb.embedding_dim % recipe.block_size == 0:
        if tied and isinstance(quantized.get("lm_head"), BlockQuantLinear):
            table = quantized["lm_head"]
            info["embedding"] = f"{table.bits}-bit blocks of {recipe.block_size}, shared with the LM head"
        else:
            table = BlockQuantLinear(*minmax_blocks(emb.weight, 4, recipe.block_size), 4, recipe.block_size,
                                     emb.embedding_dim)
            emb.weight.copy_(table.dequantized())
            info["embedding"] = f"4-bit blocks of {recipe.block_size}"
    else:
        info["embedding"] = "float32"
    io = ExportDecoder(src, max_context=max_context, cache="io", attention=attention).eval()
    work = path.parent / f".{path.name}.fp32"
    work.mkdir(parents=True, exist_ok=True)
    try:
        export_onnx(io, work / "model.onnx")
        info["graph"] = write_block_quantized(work / "model.onnx", path, list(quantized.items()), table,
                                              recipe.accuracy_level)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["accuracy_level"] = recipe.accuracy_level
    return info, src


#: floats hashed at a time by :func:`_key` and :func:`_file_key` (16 MB of float32)
_HASH_SLAB = 1 << 22


def _slab_rows(shape: tuple) -> int:
    """Rows of an array of ``shape`` that :func:`_key` and :func:`_file_key` hash at a time."""
    return max(1, _HASH_SLAB // max(1, math.prod(shape[1:])))


def _key(a: np.ndarray) -> tuple:
    """The shape (at least 1-d) and a digest of ``a``'s values as a C-ordered float32 array, hashed a slab of rows
    at a time, so a transposed view is never copied whole (a 1.5B model's LM head is 0.9 GB)."""
    a = np.atleast_1d(a)
    h = hashlib.blake2b(digest_size=16)
    rows = _slab_rows(a.shape)
    for i in range(0, a.shape[0], rows):
        h.update(np.ascontiguousarray(a[i:i + rows], dtype=np.float32))
    return a.shape, h.digest()


def _file_key(init, base: str) -> tuple | None:
    """:func:`_key` of a float32 initializer kept in an external data file, read from the file a slab at a time
    (never the whole tensor); ``None`` for any other initializer."""
    from onnx import TensorProto, external_data_helper

    if init.data_type != TensorProto.FLOAT or not external_data_helper.uses_external_data(init) or not init.dims:
        return None
    info = external_data_helper.ExternalDataInfo(init)
    shape = tuple(init.dims)
    count = math.prod(shape)
    if info.length and info.length != 4 * count:
        return None
    h = hashlib.blake2b(digest_size=16)
    step = _slab_rows(shape) * math.prod(shape[1:])
    with open(Path(base) / info.location, "rb") as f:
        f.seek(info.offset or 0)
        for start in range(0, count, step):
            slab = np.fromfile(f, dtype="<f4", count=min(step, count - start))
            h.update(np.ascontiguousarray(slab, dtype=np.float32))
    return shape, h.digest()


def _pack_blocks(mod: BlockQuantLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``MatMulNBits``' three constants of ``mod``: ``B [N, blocks, block·bits/8]`` (4-bit: two per byte, the even
    input channel in the low nibble), ``scales [N, blocks]``, ``zero_points`` (4-bit: two blocks per byte, the even
    block in the low nibble, ``[N, ceil(blocks/2)]``; 8-bit: ``[N, blocks]``). ``GatherBlockQuantized`` reads the
    same three, ``B`` reshaped to ``[N, blocks·block·bits/8]`` (:func:`_gather_blocks`)."""
    q = mod.q.numpy()
    n, kp = q.shape
    blocks = kp // mod.block
    z = mod.zero_points.numpy()
    if mod.bits == 4:
        b = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, blocks, mod.block // 2)
        if blocks % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    else:
        b = q.reshape(n, blocks, mod.block)
        zp = z
    return b, mod.scales.numpy().astype(np.float32), zp


def write_block_quantized(src: str | Path, dst: str | Path, linears: list[tuple[str, BlockQuantLinear]],
                          table: BlockQuantLinear | None, accuracy_level: int) -> dict:
    """Rewrite the fp32 graph ``src`` (exported with ``linears``' dequantized weights) into ``dst``: each
    ``MatMul`` whose weight is one of them (a ``[K, N]`` constant, or a ``Transpose`` of the ``[N, K]`` constant a
    tied table shares) and each ``Gemm`` on one becomes ``MatMulNBits``; the ``Gather`` of ``table``'s dequantized
    rows becomes ``GatherBlockQuantized`` on the same constants. Weights are found by value (the exporter names
    and folds them its own way); every one must be found. Returns the graph's op counts of interest.

    The fp32 weights stay in ``src``'s external data file: each is read once, to be found by value, and only the
    constants the rewritten graph keeps (norms, biases) are loaded to be written, so the rewrite never holds the
    fp32 graph's weights in memory (a 1.5B model's 7 GB)."""
    import onnx
    from onnx import external_data_helper, helper, numpy_helper

    base = str(Path(src).parent)
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    # Linears with the same dequantized weight share a key: any one's blocks hold those values, and all are found
    by_kn: dict[tuple, list[tuple[str, BlockQuantLinear]]] = {}
    by_nk: dict[tuple, list[tuple[str, BlockQuantLinear]]] = {}
    for name, mod in linears:
        w = mod.dequantized().numpy()
        by_kn.setdefault(_key(w.T), []).append((name, mod))
        by_nk.setdefault(_key(w), []).append((name, mod))
    table_key = _key(table.dequantized().numpy()) if table is not None else None
    table_name = next((n for n, m in linears if m is table), "embed_tokens")
    producer = {o: n for n in graph.node for o in n.output}
    packed: dict[int, list[str]] = {}
    new_inits: list = []

    def constants(name: str, mod: BlockQuantLinear) -> list[str]:
        if id(mod) not in packed:
            names = [f"{name}.MatMulNBits.{part}" for part in ("B", "scales", "zero_points")]
            for n_, arr in zip(names, _pack_blocks(mod)):
                new_inits.append(numpy_helper.from_array(arr, n_))
            packed[id(mod)] = names
        return packed[id(mod)]

    value_cache: dict[str, tuple] = {}

    def key_of(name: str) -> tuple | None:
        if name not in inits:
            return None
        if name not in value_cache:
            init = inits[name]
            key = _file_key(init, base)  # a weight: hashed from the data file; the graph's entry stays on disk
            if key is None:
                if external_data_helper.uses_external_data(init):
                    init = onnx.TensorProto()
                    init.CopyFrom(inits[name])
                    external_data_helper.load_external_data_for_tensor(init, base)
                key = _key(numpy_helper.to_array(init))
            value_cache[name] = key
        return value_cache[name]

    def weight_of(name: str, transposed: bool) -> list[tuple[str, BlockQuantLinear]] | None:
        """The quantized Linears whose weight the MatMul input ``name`` is (``transposed``: ``[N, K]`` given)."""
        if name in inits:
            k = key_of(name)
            return (by_nk if transposed else by_kn).get(k)
        node = producer.get(name)
        if node is not None and node.op_type == "Transpose" and node.input[0] in inits \
                and [a.ints for a in node.attribute if a.name == "perm"] in ([], [[1, 0]]):
            k = key_of(node.input[0])
            return (by_kn if transposed else by_nk).get(k)
        return None

    nodes, found = [], set()
    for node in graph.node:
        hit = None
        if node.op_type == "MatMul":
            hit = weight_of(node.input[1], False)
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0):
                hit = weight_of(node.input[1], bool(attrs.get("transB", 0)))
        elif node.op_type == "Gather" and table is not None and key_of(node.input[0]) == table_key \
                and not any(a.name == "axis" and a.i != 0 for a in node.attribute):
            nodes += _gather_blocks(node, table, constants(table_name, table), new_inits)
            found.add("embed_tokens")
            continue
        if hit is None:
            nodes.append(node)
            continue
        name, mod = hit[0]
        b, s, z = constants(name, mod)
        out = node.output[0]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        mm_out = out + "_nobias" if bias else out
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], b, s, z], [mm_out], name=node.name + "_q",
                                      domain="com.microsoft", K=mod.in_features, N=mod.out_features, bits=mod.bits,
                                      block_size=mod.block, accuracy_level=accuracy_level))
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=node.name + "_bias"))
        found.update(n for n, _ in hit)
    missing = sorted({n for n, _ in linears} - found) + (["the token embedding"] if table is not None
                                                         and "embed_tokens" not in found else [])
    if missing:
        raise RuntimeError(f"the 4-bit rewrite did not find the weights of {', '.join(missing)} in the exported "
                           "graph; please report it")
    del graph.node[:]
    graph.node.extend(_live(nodes, [o.name for o in graph.output]))
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    external_data_helper.load_external_data_for_model(model, base)  # what is kept, to be written with the graph
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    dst = Path(dst)
    data = dst.name + ".data"
    if (dst.parent / data).exists():
        (dst.parent / data).unlink()
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    onnx.checker.check_model(str(dst), full_check=False)
    ops: dict[str, int] = {}
    for n in graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather", "Attention"):
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"ops": ops}


def _gather_blocks(node, table: BlockQuantLinear, names: list[str], new_inits: list) -> list:
    """``GatherBlockQuantized`` in place of the ``Gather`` ``node`` of ``table``'s rows, reading its ``MatMulNBits``
    constants ``names`` (B, scales, zero points: a tied table is stored once): B ``[V, blocks, block·bits/8]``
    reshaped to the ``[V, D·bits/8]`` rows the op gathers (``D`` a whole number of blocks)."""
    from onnx import helper, numpy_helper

    b, s, z = names
    stem = node.name or node.output[0]
    v, blocks = table.scales.shape
    shape = numpy_helper.from_array(np.array([v, blocks * table.block * table.bits // 8], np.int64), f"{b}.rows_shape")
    if shape.name not in {i.name for i in new_inits}:  # a second Gather of the table reads the same shape
        new_inits.append(shape)
    rows = f"{stem}_packed_rows"
    return [helper.make_node("Reshape", [b, shape.name], [rows], name=f"{stem}_rows"),
            helper.make_node("GatherBlockQuantized", [rows, node.input[1], s, z], list(node.output), name=f"{stem}_q",
                             domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=table.block,
                             bits=table.bits)]


def _live(nodes: list, outputs: list[str]) -> list:
    """``nodes`` less those whose outputs nothing reads (a tied table's ``Transpose`` once its MatMul is gone)."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]
