"""Export benchmark: SmolLM2-135M-Instruct (dequantized Q4_1) dense and FASP-0.3 (``--align 32``: every pruned
width fits the 4-bit groups), each as ExecuTorch fp32, ExecuTorch 8da4w (the default recipe, calibrated symmetric
groups, calibrated on WikiText-2 validation; and the asymmetric one, `--qparams asymmetric`), ONNX fp32 and ONNX
4-bit (``--quant 4bit``, calibrated on WikiText-2 validation) bundles:
export seconds, file sizes, delegate partitions, parity, and the quality of each artifact measured through its own
runtime (4 windows x 512 tokens of WikiText-2 test, teacher-forced, against the PyTorch model it was made from).

    .venv/bin/python benchmarks/export.py            # about 30 min on 2 cores (prunes if checkpoints are absent)

Pruned checkpoints are made (or reused) under out/: calibration 128 x 512 tokens of WikiText-2
validation, seed 0. Writes benchmarks/results/export.json and export.md, with the figures of the export
that landed before the delegated decoder (issue 11) beside them, and checks the bars: dense 8da4w model files
<= 110 MB, dense fp32 <= 560 MB, 8da4w and ONNX 4-bit perplexity within 1.10x of the fp32 PyTorch model, dense
ONNX 4-bit model files <= 0.30x the fp32 ONNX ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASP_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIB = DATA / "wikitext2" / "wiki.valid.tokens"
TEST = DATA / "wikitext2" / "wiki.test.joined.txt"
# the export that landed before the delegated decoder, measured on this machine (results/export.json of 29b74ba ..
# 65a0bbe, and issue 11): model file MB and export seconds
BEFORE = {("dense", "pte-fp32"): (653.3, 465), ("dense", "pte-8da4w"): (191.1, 661), ("dense", "onnx-fp32"): (540.7, 76),
          ("fasp30", "pte-fp32"): (542.2, 261), ("fasp30", "pte-8da4w"): (186.8, 488), ("fasp30", "onnx-fp32"): (429.5, 51)}
FE = [sys.executable, "-m", "fasp_edge.cli", "--quiet"]
#: (bundle suffix, format, quant, extra export flags): pte-8da4w is the default recipe (calibrated symmetric groups),
#: calibrated on WikiText-2 validation (never the test text); pte-8da4w-asym the asymmetric one
VARIANTS = [("pte-fp32", "pte", "none", []), ("pte-8da4w", "pte", "8da4w", ["--calib-text", str(CALIB)]),
            ("pte-8da4w-asym", "pte", "8da4w", ["--qparams", "asymmetric"]), ("onnx-fp32", "onnx", "none", []),
            ("onnx-4bit", "onnx", "4bit", ["--calib-text", str(CALIB)])]


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"export.py: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dense,fasp30")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--work", default=str(REPO / "out"))
    ap.add_argument("--bundles", default=str(REPO / "bundles"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--reuse", action="store_true", help="read bundles that already exist instead of exporting again")
    args = ap.parse_args()
    work, bundles = Path(args.work), Path(args.bundles)
    rows = []
    for name in args.models.split(","):
        source: list[str] = []
        missing = [v for v, *_ in VARIANTS
                   if not (args.reuse and (bundles / f"smollm2-{name}-{v}" / "manifest.json").exists())]
        if name != "dense":
            ckpt = work / f"smollm2-{name}-a32"
            if missing and not (ckpt / "config.json").exists():
                print(f"pruning {name} ...", file=sys.stderr, flush=True)
                run([*FE, "prune", "--sparsity", str(int(name.removeprefix("fasp")) / 100), "--align", "32",
                     "--calib-file", str(CALIB), "--nsamples", "128", "--seqlen", "512", "--seed", "0", "-o", str(ckpt)])
            source = [str(ckpt)]
        for variant, fmt, quant, extra in VARIANTS:
            out = bundles / f"smollm2-{name}-{variant}"
            if variant not in missing:
                seconds = float("nan")  # reused: the export time is in the manifest
            else:
                print(f"exporting {name} {variant} ...", file=sys.stderr, flush=True)
                seconds = run([*FE, "export", *source, "--formats", fmt, "--quant", quant, *extra, "--max-context",
                               str(args.max_context), "--quality-text", str(TEST), "-o", str(out), "--overwrite"])
            m = json.loads((out / "manifest.json").read_text())
            art = m["artifacts"][fmt]
            model_files = [f for f in m["files"] if f.startswith("model.")]
            row = {"model": name, "variant": variant, "format": fmt, "quant": quant,
                   "cli_seconds": round(seconds, 1), "export_seconds": art.get("export_seconds", round(seconds, 1)),
                   "model_bytes": sum(m["files"][f]["bytes"] for f in model_files),
                   "bundle_bytes": sum(f["bytes"] for f in m["files"].values()),
                   "parity": m["parity"][fmt], "decoder_parity": m["parity"]["decoder_vs_transformers"],
                   "parameters": m["model"]["parameters"], "quantization": art.get("quantization"),
                   "quality": m.get("quality", {}).get(fmt), "lowering": art.get("lowering"),
                   "before": dict(zip(("model_mb", "export_seconds"), BEFORE.get((name, variant), (None, None))))}
            rows.append(row)
            print(f"  {row['model_bytes'] / 1e6:.1f} MB, parity {row['parity']['max_abs_diff']:.2e}, "
                  f"greedy agreement {row['parity']['greedy_token_agreement']:.2f}", file=sys.stderr, flush=True)
    size = {(r["model"], r["variant"]): r["model_bytes"] for r in rows}
    bars = {}
    for v in ("pte-8da4w", "pte-8da4w-asym"):
        if ("dense", v) in size:
            bars[f"dense_{v.replace('-', '_')}_model_mb (bar 110)"] = size[("dense", v)] / 1e6
    if ("dense", "onnx-4bit") in size and ("dense", "onnx-fp32") in size:
        bars["dense_onnx_4bit_model_bytes_vs_onnx_fp32 (bar 0.30)"] = size[("dense", "onnx-4bit")] / size[("dense", "onnx-fp32")]
    if ("dense", "pte-fp32") in size:
        bars["dense_pte_fp32_model_mb (bar 560)"] = size[("dense", "pte-fp32")] / 1e6
    for r in rows:
        if r["quant"] in ("8da4w", "4bit") and r["quality"]:
            bars[f"{r['model']}_{r['variant'].replace('-', '_')}_perplexity_ratio (bar 1.10)"] = r["quality"]["perplexity_ratio"]
    result = {"command": "python benchmarks/export.py " + " ".join(sys.argv[1:]), "max_context": args.max_context,
              "rows": rows, "bars": bars}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"SmolLM2-135M-Instruct (dequantized Q4_1), max context {args.max_context}; parity = max |Δ logits| "
             "vs transformers over a 64-token prefill + 32 greedy decode steps; quality = the artifact through its own "
             "runtime on 4 x 512 tokens of WikiText-2 test, teacher-forced, against the PyTorch model it was made from "
             "(`python benchmarks/export.py`). Before = the export that landed before the delegated decoder; export s = the "
             "artifact's stage (quantizing, lowering, serialising, parity); CLI s = the whole `fasp-edge export` process "
             "(loading, calibration text or sampling, the quality pass too).", "",
             "| model | artifact | model file(s) MB (before) | export s (before) | CLI s | lowering s | partitions | "
             "delegated nodes | parity max abs diff | perplexity vs PyTorch | top-1 agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, q, low = r["before"], r["quality"] or {}, r["lowering"] or {}
        lines.append(f"| {r['model']} | {r['variant']} | {r['model_bytes'] / 1e6:.1f} ({b['model_mb'] or '–'}) | "
                     f"{r['export_seconds']:.0f} ({b['export_seconds'] or '–'}) | {r['cli_seconds']:.0f} | "
                     f"{low.get('lowering_seconds', '–')} | "
                     f"{low.get('delegate_partitions', '–')} | {low.get('delegated_nodes', '–')} | "
                     f"{r['parity']['max_abs_diff']:.2e} | {q.get('perplexity_ratio', float('nan')):.3f}x | "
                     f"{q.get('top1_agreement', float('nan')):.3f} |")
    lines += ["", *(f"- {k}: {v:.3f}" for k, v in bars.items())]
    (out / "export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
