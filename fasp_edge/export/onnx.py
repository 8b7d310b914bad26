"""ONNX export with explicit KV-cache inputs and outputs (run by :class:`fasp_edge.runtime.onnx.OnnxModel`).

Graph interface (batch 1):

* inputs: ``input_ids [1, T]`` int64, then per layer ``past_key_values.{i}.key [1, kv_heads, P, head_dim]``
  and ``past_key_values.{i}.value [1, kv_heads, P, v_head_dim]`` (P = 0 on the first call);
* outputs: ``logits [1, vocab]`` (last position), then ``present.{i}.key`` / ``present.{i}.value``
  (``P + T`` positions) to feed back as the next call's past.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..models.decoder import ExportDecoder
from ..runtime.onnx import io_names

log = logging.getLogger(__name__)


class _Forward(nn.Module):
    """Flat positional signature for the exporter: ``forward(input_ids, *past)``."""

    def __init__(self, decoder: ExportDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]):
        return self.decoder(input_ids, *past)


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
                                 optimize=True, verbose=False, report=False)
        prog.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=False)


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """Dynamic int8 weight quantization of the MatMul weights (ONNX Runtime's ``quantize_dynamic``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, use_external_data_format=True)
