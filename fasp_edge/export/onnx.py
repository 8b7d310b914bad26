"""ONNX export with explicit KV-cache inputs and outputs, and an ONNX Runtime wrapper.

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
    """An ONNX decoder in ONNX Runtime (CPU) with its KV cache kept between ``step`` calls.

    Runs this package's graphs (see the module docstring) and also the decoder-with-past graphs of
    ``optimum-onnx`` (extra ``attention_mask``/``position_ids`` inputs, logits for every position), which
    ``fasp-edge bench --optimum-onnx`` uses as the reference ONNX export.
    """

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
        self.inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        names = {i.name for i in self.session.get_inputs()}
        self.needs_mask, self.needs_positions = "attention_mask" in names, "position_ids" in names
        self.output_names = [o.name for o in self.session.get_outputs()]
        # present.{i}.key -> past_key_values.{i}.key: the next call's past, matched by name not by order
        self.feeds_back = {o: "past_key_values." + o.removeprefix("present.") for o in self.output_names
                           if o.startswith("present.")}
        self.reset()

    def thread_settings(self) -> dict[str, int | bool]:
        """Thread settings read back from the session (0 = ONNX Runtime's default: one per core)."""
        opts = self.session.get_session_options()
        return {"ort_intra_op_threads": opts.intra_op_num_threads, "ort_inter_op_threads": opts.inter_op_num_threads,
                "ort_spinning": opts.get_session_config_entry("session.intra_op.allow_spinning") != "0"}

    def reset(self) -> None:
        self.past = {i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], dtype=np.float32) for i in self.inputs}

    def step(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Logits after ``tokens`` at positions ``start..``; ``start == 0`` begins a new sequence and an earlier
        ``start`` than the positions held drops those from ``start`` on (as a .pte overwrites them)."""
        if start == 0:
            self.reset()
        length = next(iter(self.past.values())).shape[2] if self.past else 0
        if start < length:
            self.past = {name: past[:, :, :start] for name, past in self.past.items()}
            length = start
        if start != length:
            raise ValueError(f"ONNX decoder holds {length} positions, asked to continue at {start}")
        ids = tokens.to(torch.long).reshape(1, -1).numpy()
        feeds = {"input_ids": ids, **self.past}
        if self.needs_mask:
            feeds["attention_mask"] = np.ones((1, length + ids.shape[1]), dtype=np.int64)
        if self.needs_positions:
            feeds["position_ids"] = np.arange(length, length + ids.shape[1], dtype=np.int64)[None]
        outs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        self.past = {self.feeds_back[name]: outs[name] for name in self.feeds_back}
        logits = outs["logits"]
        return torch.from_numpy(logits[0, -1] if logits.ndim == 3 else logits.reshape(-1))
