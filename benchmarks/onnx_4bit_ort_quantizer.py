"""ONNX Runtime's OWN 4-bit quantizer (``MatMulNBitsQuantizer``) on our SmolLM2 ONNX export: size, quality and decode
speed per quantizer setting, against the fp32 graph, in one run: the peer that ``--quant 4bit`` (our calibrated
blocks, ``benchmarks/onnx_4bit.py``) was chosen against: its round-to-nearest grids cost 1.24-1.34x the perplexity,
and HQQ's float zero points, which hold the Q4_1 weights exactly, run on a slow path.

    .venv/bin/python benchmarks/onnx_4bit_ort_quantizer.py            # ~10 min on 2 cores

Exports the dense SmolLM2-135M-Instruct (dequantized Q4_1) fp32 ONNX bundle once (``out/bundles/smollm2-dense-onnx``),
then quantizes its ``MatMul`` weights with ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``
(the settings in ``SETTINGS``: ONNX Runtime's default blockwise min/max grid, asymmetric or symmetric, and HQQ;
block sizes; ``accuracy_level`` 4 = int8 activations on CPU, 0 = fp32). Each graph is measured through ONNX Runtime:

- model files: ``model.onnx`` + its external data, MB;
- quality: teacher-forced, one token per call, on the first 4 windows of 512 tokens of WikiText-2 **validation**
  (choices are made on validation text, never on test): perplexity ratio and top-1 agreement against the PyTorch
  model (``fasp_edge.export.bundle.artifact_quality``, what a bundle's manifest records);
- decode tokens/s: 2 threads (the hub profile's), a 32-token prompt then 64 tokens, 5 generations per graph,
  the graphs interleaved round by round in one process; median.

Caveat: the default model's weights are dequantized Q4_1 (asymmetric blocks of 32 with float offsets), so a grid with
float zero points and blocks of 32 along the same axis (HQQ here) can hold them almost exactly; a FASP-pruned model,
whose refit weights are off that grid, is the fair test of a setting's quality.

Writes benchmarks/results/onnx-4bit-ort-quantizer.{json,md}.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASP_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
VALID = DATA / "wikitext2" / "wiki.valid.tokens"
OUT = REPO / "out" / "onnx-4bit"
BUNDLE = REPO / "out" / "bundles" / "smollm2-dense-onnx"
RESULTS = REPO / "benchmarks" / "results"

#: name -> MatMulNBitsQuantizer settings
SETTINGS = {
    "default-asym-b32-acc4": {"algo": "default", "block": 32, "symmetric": False, "accuracy_level": 4},
    "default-sym-b32-acc4": {"algo": "default", "block": 32, "symmetric": True, "accuracy_level": 4},
    "default-asym-b128-acc4": {"algo": "default", "block": 128, "symmetric": False, "accuracy_level": 4},
    "default-asym-b32-acc0": {"algo": "default", "block": 32, "symmetric": False, "accuracy_level": 0},
    "hqq-b32-acc4": {"algo": "hqq", "block": 32, "symmetric": False, "accuracy_level": 4},
}


def quantize(src: Path, dst: Path, s: dict) -> float:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    t0 = time.perf_counter()
    model = onnx.load(str(src))
    cfg = None
    if s["algo"] == "hqq":
        cfg = mq.HQQWeightOnlyQuantConfig(block_size=s["block"], bits=4)
    q = mq.MatMulNBitsQuantizer(model, bits=4, block_size=s["block"], is_symmetric=s["symmetric"],
                                accuracy_level=s["accuracy_level"], algo_config=cfg)
    q.process()
    dst.parent.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(str(dst), use_external_data_format=True)
    return time.perf_counter() - t0


def files_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name)) / 1e6


def main() -> int:
    import torch

    from fasp_edge import export_bundle, load_model
    from fasp_edge.export.bundle import artifact_quality, quality_windows
    from fasp_edge.pipeline.calibration import read_text_file
    from fasp_edge.runtime.bundle import load_bundle
    from fasp_edge.runtime.engines import OnnxEngine, generate

    loaded = load_model()
    if not (BUNDLE / "manifest.json").is_file():
        export_bundle(loaded, BUNDLE, formats=["onnx"], max_context=512, quality_windows_count=0, overwrite=True)
    bundle = load_bundle(BUNDLE)
    graphs = {"fp32": BUNDLE / "model.onnx"}
    rows: dict[str, dict] = {"fp32": {"setting": None, "quantize_s": None}}
    for name, s in SETTINGS.items():
        dst = OUT / name / "model.onnx"
        secs = None if dst.is_file() else quantize(graphs["fp32"], dst, s)
        graphs[name] = dst
        rows[name] = {"setting": s, "quantize_s": None if secs is None else round(secs, 1)}
        print(f"{name}: quantized" + ("" if secs is None else f" in {secs:.0f} s"), file=sys.stderr, flush=True)
    windows, source = quality_windows(loaded, text=read_text_file(str(VALID)), windows=4, seqlen=512, progress=False)
    for name, path in graphs.items():
        engine = OnnxEngine(path, 512, threads=2)
        rows[name]["model_mb"] = round(files_mb(path), 1)
        rows[name]["quality"] = artifact_quality(loaded.model, engine.step, windows, progress=False)
        print(f"{name}: {rows[name]['model_mb']} MB, perplexity x{rows[name]['quality']['perplexity_ratio']:.3f}",
              file=sys.stderr, flush=True)
    torch.set_num_threads(1)
    engines = {name: OnnxEngine(path, 512, threads=2) for name, path in graphs.items()}
    prompt = loaded.tokenizer(read_text_file(str(VALID))[:2000], add_special_tokens=False).input_ids[:32]
    speeds: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(5):
        for name, engine in engines.items():
            speeds[name].append(generate(engine, prompt, 64).decode_tokens_per_s)
    for name in graphs:
        rows[name]["decode_tokens_per_s"] = round(statistics.median(speeds[name]), 1)
        rows[name]["decode_runs"] = [round(v, 1) for v in speeds[name]]
    fp32 = rows["fp32"]
    doc = {"model": loaded.source, "bundle": str(BUNDLE.relative_to(REPO)), "quality_text": source,
           "decode": "2 ONNX Runtime threads, 32-token prompt, 64 tokens, median of 5 interleaved generations",
           "versions": bundle.manifest["versions"], "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onnx-4bit-ort-quantizer.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# ONNX Runtime 4-bit weights (MatMulNBits) on SmolLM2-135M-Instruct (dequantized Q4_1)", "",
             "`.venv/bin/python benchmarks/onnx_4bit_ort_quantizer.py`. Quality: teacher-forced through ONNX Runtime on 4 x 512 "
             "tokens of WikiText-2 validation, against the PyTorch fp32 model. Decode: 2 threads, 32-token prompt, "
             "64 tokens, median of 5 generations, every graph in one process, interleaved.", "",
             "| graph | model MB | size / fp32 | perplexity ratio | top-1 agreement | decode tok/s | decode / fp32 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        q = r["quality"]
        lines.append(f"| {name} | {r['model_mb']} | {r['model_mb'] / fp32['model_mb']:.2f} | "
                     f"{q['perplexity_ratio']:.3f} | {q['top1_agreement']:.3f} | {r['decode_tokens_per_s']} | "
                     f"{r['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:.2f} |")
    (RESULTS / "onnx-4bit-ort-quantizer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
