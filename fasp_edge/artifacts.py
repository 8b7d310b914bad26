"""The artifact kinds: every format x quantization fasp-edge writes, in one table that every other place reads
(export's argument check, the bundle's files, the runtime that opens it, ``fasp-edge run``'s ``artifacts`` keys
and its export schedule, the reports' precision words, and what the Android app accepts).

Standard library only: the benchmark's measuring child may read it before it applies its profile.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of shipped artifact."""

    key: str  #: the name in ``fasp-edge run``'s ``artifacts`` list and in its report
    format: str  #: ``--formats`` value; also the bundle's artifact entry and the runtime backend that runs it
    quant: str  #: ``--quant`` value
    file: str  #: the model file in a bundle (external data files are listed in the manifest)
    runtime: str  #: what runs it (ExecuTorch's XNNPACK delegate, ONNX Runtime's CPU provider)
    precision: str  #: the words a report uses for its precision
    android: bool  #: the demo app (android_demo, core Backend.kt) runs it
    export_cost: float  #: relative export time, for scheduling ``fasp-edge run``'s exports longest first
    #: (measured alone on SmolLM2-135M: 8da4w ~500-650 s, fp32 pte ~290 s, onnx ~60-120 s, onnx 4bit ~160-170 s)


KINDS: tuple[ArtifactKind, ...] = (
    ArtifactKind("pte", "pte", "none", "model.pte", "ExecuTorch, XNNPACK", "fp32", True, 2),
    ArtifactKind("pte-8da4w", "pte", "8da4w", "model.pte", "ExecuTorch, XNNPACK",
                 "4-bit weights in groups of 32, 8-bit dynamic activations", True, 3),
    ArtifactKind("onnx", "onnx", "none", "model.onnx", "ONNX Runtime", "fp32", True, 1),
    ArtifactKind("onnx-int8", "onnx", "int8", "model.onnx", "ONNX Runtime", "int8 weights", True, 1.5),
    ArtifactKind("onnx-4bit", "onnx", "4bit", "model.onnx", "ONNX Runtime",
                 "4-bit weights in blocks of 32 (MatMulNBits), int8 compute", True, 2),
)

BY_KEY: dict[str, ArtifactKind] = {k.key: k for k in KINDS}
FORMATS: tuple[str, ...] = tuple(dict.fromkeys(k.format for k in KINDS))  #: ("pte", "onnx")
QUANTS: dict[str, tuple[str, ...]] = {q: tuple(k.format for k in KINDS if k.quant == q)
                                      for q in dict.fromkeys(k.quant for k in KINDS)}  #: quant -> formats
BACKENDS: tuple[str, ...] = (*FORMATS, "torch")  #: what a runtime engine runs: an artifact format, or PyTorch
#: the quantizations whose default recipe calibrates on token windows (``--calib-text`` / ``--calib-windows``)
CALIBRATED_QUANTS: tuple[str, ...] = ("8da4w", "4bit")
