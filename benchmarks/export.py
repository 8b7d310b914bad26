"""Export benchmark: SmolLM2-135M-Instruct (dequantized Q4_1) dense and FASP at 0.2 and 0.3, each as
ExecuTorch fp32, ExecuTorch 8da4w and ONNX fp32 bundles: export seconds, file sizes, parity figures.

    .venv/bin/python benchmarks/export.py            # about an hour on 2 cores (prunes if checkpoints are absent)

Pruned checkpoints are made (or reused) under out/: calibration 128 x 512 tokens of WikiText-2
validation, seed 0. Writes benchmarks/results/export.json and export.md, and checks the size bars:
8da4w dense .pte <= 0.35x the fp32 dense .pte; FASP-0.3 fp32 .pte <= 0.85x the dense fp32 .pte.
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
FE = [sys.executable, "-m", "fasp_edge.cli", "--quiet"]
VARIANTS = [("pte-fp32", "pte", "none"), ("pte-8da4w", "pte", "8da4w"), ("onnx-fp32", "onnx", "none")]


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"export.py: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dense,fasp20,fasp30")
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
        missing = [v for v, _, _ in VARIANTS
                   if not (args.reuse and (bundles / f"smollm2-{name}-{v}" / "manifest.json").exists())]
        if name != "dense":
            ckpt = work / f"smollm2-{name}"
            if missing and not (ckpt / "config.json").exists():
                print(f"pruning {name} ...", file=sys.stderr, flush=True)
                run([*FE, "prune", "--sparsity", str(int(name.removeprefix("fasp")) / 100), "--calib-file",
                     str(CALIB), "--nsamples", "128", "--seqlen", "512", "--seed", "0", "-o", str(ckpt)])
            source = [str(ckpt)]
        for variant, fmt, quant in VARIANTS:
            out = bundles / f"smollm2-{name}-{variant}"
            if variant not in missing:
                seconds = float("nan")  # reused: the export time is in the manifest
            else:
                print(f"exporting {name} {variant} ...", file=sys.stderr, flush=True)
                seconds = run([*FE, "export", *source, "--formats", fmt, "--quant", quant, "--max-context",
                               str(args.max_context), "-o", str(out), "--overwrite"])
            m = json.loads((out / "manifest.json").read_text())
            art = m["artifacts"][fmt]
            model_files = [f for f in m["files"] if f.startswith("model.")]
            row = {"model": name, "variant": variant, "format": fmt, "quant": quant,
                   "cli_seconds": round(seconds, 1), "export_seconds": art.get("export_seconds", round(seconds, 1)),
                   "model_bytes": sum(m["files"][f]["bytes"] for f in model_files),
                   "bundle_bytes": sum(f["bytes"] for f in m["files"].values()),
                   "parity": m["parity"][fmt], "decoder_parity": m["parity"]["decoder_vs_transformers"],
                   "parameters": m["model"]["parameters"], "quantization": art.get("quantization")}
            rows.append(row)
            print(f"  {row['model_bytes'] / 1e6:.1f} MB, parity {row['parity']['max_abs_diff']:.2e}, "
                  f"greedy agreement {row['parity']['greedy_token_agreement']:.2f}", file=sys.stderr, flush=True)
    size = {(r["model"], r["variant"]): r["model_bytes"] for r in rows}
    bars = {}
    if ("dense", "pte-fp32") in size and ("dense", "pte-8da4w") in size:
        bars["8da4w_over_fp32_dense_pte"] = size[("dense", "pte-8da4w")] / size[("dense", "pte-fp32")]
    if ("dense", "pte-fp32") in size and ("fasp30", "pte-fp32") in size:
        bars["fasp30_over_dense_fp32_pte"] = size[("fasp30", "pte-fp32")] / size[("dense", "pte-fp32")]
    result = {"command": "python benchmarks/export.py " + " ".join(sys.argv[1:]), "max_context": args.max_context,
              "rows": rows, "size_ratios": bars}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"SmolLM2-135M-Instruct (dequantized Q4_1), max context {args.max_context}; parity = max |Δ logits| "
             "vs transformers over a 64-token prefill + 32 greedy decode steps.", "",
             "| model | artifact | model file(s) MB | export s | parity max abs diff | greedy agreement |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['model_bytes'] / 1e6:.1f} | {r['export_seconds']:.0f} | "
                     f"{r['parity']['max_abs_diff']:.2e} | {r['parity']['greedy_token_agreement']:.2f} |")
    lines += ["", *(f"- {k}: {v:.3f}" for k, v in bars.items())]
    (out / "export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
