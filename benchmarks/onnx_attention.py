"""The ONNX graph's attention, decomposed (MatMul, Softmax, grouped heads by reshapes; the exporter's default opset)
against fused (``scaled_dot_product_attention`` exported as opset 23's ``Attention`` op, which also brings
``RMSNormalization``): dense SmolLM2-135M-Instruct (dequantized Q4_1), fp32 and 4-bit graphs, decode tokens/s
through ONNX Runtime, 2 threads, a 64-token prompt then 64 greedy tokens, the four graphs interleaved round by round
in one process (median and per-round ratios). It decided ``fasp_edge.export.onnx.ONNX_ATTENTION``.

    .venv/bin/python benchmarks/onnx_attention.py            # ~15 min on 2 cores (two 4-bit exports); run it alone
    .venv/bin/python benchmarks/onnx_attention.py --rounds 7 --keep-8bit k_proj,v_proj

The graphs land in out/onnx-attention/ and are reused (delete them to export again). The 4-bit graphs use the
``--quant 4bit`` recipe with ``--keep-8bit`` (default: the recipe's own list), calibrated on text the model writes
itself. Writes benchmarks/results/onnx-attention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--keep-8bit", default=None, help="the 4-bit graphs' --keep-8bit (default: the recipe's)")
    ap.add_argument("--work", default=str(REPO / "out" / "onnx-attention"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    import torch

    from fasp_edge import load_model
    from fasp_edge.export.bundle import quantizer_windows
    from fasp_edge.export.onnx import export_onnx, export_onnx_4bit
    from fasp_edge.export.quantize import BlockRecipe
    from fasp_edge.models.decoder import ATTENTION_MODES, ExportDecoder
    from fasp_edge.runtime.engines import OnnxEngine, generate

    loaded = load_model()
    work = Path(args.work)
    recipe = BlockRecipe() if args.keep_8bit is None else \
        BlockRecipe(keep_8bit=[n.strip() for n in args.keep_8bit.split(",") if n.strip()])
    graphs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    calibration = None
    for precision in ("fp32", "4bit"):
        for attention in ATTENTION_MODES:
            name = f"{precision}-{attention}"
            path = work / name / "model.onnx"
            graphs[name] = path
            if path.is_file():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"exporting {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            if precision == "fp32":
                export_onnx(ExportDecoder(loaded.model, max_context=512, cache="io", attention=attention).eval(), path)
            else:
                if calibration is None:
                    calibration, _ = quantizer_windows(loaded, seqlen=256, progress=False)
                export_onnx_4bit(loaded.model, path, max_context=512, recipe=recipe, calibration=calibration,
                                 attention=attention)
            seconds[name] = round(time.perf_counter() - t0, 1)
    torch.set_num_threads(1)
    engines = {name: OnnxEngine(path, 512, threads=2) for name, path in graphs.items()}
    prompt = list(range(1000, 1064))
    speeds: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            speeds[name].append(generate(engine, prompt, 64).decode_tokens_per_s)
    rows = {}
    for precision in ("fp32", "4bit"):
        dec, fused = speeds[f"{precision}-decomposed"], speeds[f"{precision}-fused"]
        ratios = [f / d for f, d in zip(fused, dec)]
        rows[precision] = {"decomposed_tokens_per_s": round(statistics.median(dec), 1),
                           "fused_tokens_per_s": round(statistics.median(fused), 1),
                           "fused_over_decomposed": round(statistics.median(ratios), 3),
                           "per_round_ratios": [round(r, 3) for r in ratios]}
    doc = {"command": "python benchmarks/onnx_attention.py " + " ".join(sys.argv[1:]), "rounds": args.rounds,
           "recipe_4bit": recipe.keep_8bit, "export_seconds": seconds, "rows": rows,
           "runs": {k: [round(x, 1) for x in v] for k, v in speeds.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx-attention.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# ONNX attention: decomposed against fused (opset 23 `Attention`), dense SmolLM2-135M-Instruct", "",
             f"`{doc['command'].strip()}`: decode tok/s through ONNX Runtime, 2 threads, 64-token prompt + 64 tokens, "
             f"{args.rounds} rounds interleaved in one process.", "",
             "| graph | decomposed tok/s | fused tok/s | fused / decomposed (median of per-round ratios) |",
             "|---|---|---|---|"]
    for precision, r in rows.items():
        lines.append(f"| {precision} | {r['decomposed_tokens_per_s']} | {r['fused_tokens_per_s']} | "
                     f"{r['fused_over_decomposed']:.3f} |")
    (out / "onnx-attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
