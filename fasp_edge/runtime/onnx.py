"""Running an ONNX decoder of this package (or optimum-onnx's decoder-with-past) in ONNX Runtime.

The graph interface (batch 1), which :mod:`fasp_edge.export.onnx` writes and the Android app's ONNX engine reads:

* inputs: ``input_ids [1, T]`` int64, then per layer ``past_key_values.{i}.key [1, kv_heads, P, head_dim]``
  and ``past_key_values.{i}.value [1, kv_heads, P, v_head_dim]`` (P = 0 on the first call);
* outputs: ``logits [1, vocab]`` (last position), then ``present.{i}.key`` / ``present.{i}.value``
  (``P + T`` positions) to feed back as the next call's past.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]



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
