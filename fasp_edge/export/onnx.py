"""ONNX export with explicit KV-cache inputs and outputs, and an ONNX Runtime wrapper.

Graph interface (batch 1):

* inputs: ``input_ids [1, T]`` int64, then per layer ``past_key_values.{i}.key [1, kv_heads, P, head_dim]``
  and ``past_key_values.{i}.value [1, kv_heads, P, v_head_dim]`` (P = 0 on the first call);
* outputs: ``logits [1, vocab]`` (last position), then ``present.{i}.key`` / ``present.{i}.value``
  (``P + T`` positions) to feed back as the next call's past.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .decoder import ExportDecoder

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8")


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


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


class OnnxModel:
    """An ONNX decoder in ONNX Runtime (CPU) with its KV cache kept between ``step`` calls."""

    def __init__(self, path: str | Path, threads: int | None = None, inter_threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if inter_threads:
            opts.inter_op_num_threads = inter_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = self.session.get_inputs()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.reset()

    def reset(self) -> None:
        self.past = {i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], dtype=np.float32) for i in self.inputs[1:]}

    def step(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        length = next(iter(self.past.values())).shape[2] if self.past else 0
        if start != length:
            raise ValueError(f"ONNX decoder holds {length} positions, asked to continue at {start}")
        feeds = {"input_ids": tokens.to(torch.long).reshape(1, -1).numpy(), **self.past}
        outs = self.session.run(self.output_names, feeds)
        self.past = {i.name: o for i, o in zip(self.inputs[1:], outs[1:])}
        return torch.from_numpy(outs[0]).reshape(-1)
