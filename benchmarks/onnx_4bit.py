"""The 4-bit ONNX artifact (``--quant 4bit``): SmolLM2-135M-Instruct (dequantized Q4_1) dense and FASP-0.3
(``--align 32``) as fp32 and 4-bit ONNX bundles, their quality through ONNX Runtime on WikiText-2 test, then
``fasp-edge bench`` of the four under the hub profile (and phone-mid), in one run, with issue 15's bars:

  - dense 4-bit ONNX model files <= 0.30x the fp32 ONNX model files;
  - dense 4-bit decode >= 1.5x dense fp32 decode (hub, same run);
  - FASP-0.3 4-bit decode >= 1.15x dense 4-bit decode (hub, same run: like with like);
  - the dense 4-bit ONNX fits the hub's model memory budget (512 MB);
  - dense and FASP-0.3 4-bit perplexity within 1.10x of their fp32 PyTorch models (WikiText-2 test, 4 x 512 tokens,
    teacher-forced through ONNX Runtime; what each bundle's manifest records).

    .venv/bin/python benchmarks/onnx_4bit.py        # ~35 min on 2 cores (exports, then the bench); run it alone

The 4-bit bundles are calibrated on WikiText-2 validation (``--calib-text``), never on the test text. The FASP-0.3
checkpoint is benchmarks/export.py's (out/smollm2-fasp30-a32: 128 x 512 tokens of WikiText-2 validation, seed 0),
made here if absent. Bundles land in bundles/smollm2-{dense,fasp30}-onnx-{fp32,4bit} and are reused with --reuse.
Writes benchmarks/results/onnx-4bit.{json,md} and the bench report under benchmarks/results/onnx-4bit-bench/.
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
FE = [sys.executable, "-m", "fasp_edge.cli"]
MODELS = ("dense", "fasp30")
VARIANTS = {"onnx-fp32": ["--quant", "none"], "onnx-4bit": ["--quant", "4bit", "--calib-text", str(CALIB)]}
BARS = {"dense_4bit_size_vs_fp32": ("<=", 0.30), "dense_4bit_decode_vs_fp32_hub": (">=", 1.5),
        "fasp30_4bit_decode_vs_dense_4bit_hub": (">=", 1.15), "dense_4bit_fits_hub_budget": ("==", True),
        "dense_4bit_perplexity_ratio": ("<=", 1.10), "fasp30_4bit_perplexity_ratio": ("<=", 1.10)}


def run(cmd: list[str]) -> float:
    print(" ".join(cmd[2:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"onnx_4bit.py: {' '.join(cmd[2:])} failed (exit {proc.returncode})")
    return time.perf_counter() - t0


def model_bytes(manifest: dict) -> int:
    return sum(f["bytes"] for n, f in manifest["files"].items() if n.startswith("model."))


def holds(value, rule: tuple[str, object]) -> bool | None:
    op, bar = rule
    if value is None:
        return None
    return value <= bar if op == "<=" else value >= bar if op == ">=" else value == bar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", default=str(REPO / "bundles"))
    ap.add_argument("--work", default=str(REPO / "out"))
    ap.add_argument("--profiles", default="hub,phone-mid")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reuse", action="store_true", help="read bundles that already exist instead of exporting again")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    bundles, out = Path(args.bundles), Path(args.out)
    ckpt = Path(args.work) / "smollm2-fasp30-a32"
    if not (ckpt / "config.json").is_file():
        run([*FE, "prune", "--sparsity", "0.3", "--align", "32", "--calib-file", str(CALIB), "--nsamples", "128",
             "--seqlen", "512", "--seed", "0", "-o", str(ckpt)])
    exports = {}
    for name in MODELS:
        for variant, flags in VARIANTS.items():
            folder = bundles / f"smollm2-{name}-{variant}"
            if not (args.reuse and (folder / "manifest.json").is_file()):
                source = [] if name == "dense" else [str(ckpt)]
                exports[folder.name] = round(run([*FE, "-q", "export", *source, "--formats", "onnx", *flags,
                                                  "--max-context", "512", "--quality-text", str(TEST), "-o", str(folder),
                                                  "--overwrite"]), 1)
    folders = [bundles / f"smollm2-{m}-{v}" for m in MODELS for v in VARIANTS]
    bench_dir = out / "onnx-4bit-bench"
    run([*FE, "bench", *map(str, folders), "--profiles", args.profiles, "--backends", "onnx", "--rounds",
         str(args.rounds), "-o", str(bench_dir), "--overwrite"])
    doc = json.loads((bench_dir / "bench.json").read_text())
    rows = {(r["bundle"], r["profile"]): r for r in doc["results"] if r["status"] == "ok"}
    manifests = {f.name: json.loads((f / "manifest.json").read_text()) for f in folders}
    table = []
    for f in folders:
        m = manifests[f.name]
        art = m["artifacts"]["onnx"]
        q = m["quality"]["onnx"]
        table.append({"bundle": f.name, "model_mb": round(model_bytes(m) / 1e6, 1),
                      "parameters": m["model"]["parameters"], "export_seconds": art["export_seconds"],
                      "cli_seconds": exports.get(f.name), "perplexity_ratio": round(q["perplexity_ratio"], 4),
                      "perplexity": round(q["perplexity"], 3), "reference_perplexity": round(q["reference_perplexity"], 3),
                      "top1_agreement": round(q["top1_agreement"], 4), "quantization": art.get("quantization"),
                      "parity_dequantized": art.get("parity_dequantized"), "kv_cache": art.get("kv_cache")})

    def row(bundle: str, profile: str = "hub") -> dict:
        return rows.get((f"smollm2-{bundle}", profile)) or {}

    dense4, dense32, fasp4 = row("dense-onnx-4bit"), row("dense-onnx-fp32"), row("fasp30-onnx-4bit")
    sizes = {r["bundle"]: r["model_mb"] for r in table}
    values = {
        "dense_4bit_size_vs_fp32": round(sizes["smollm2-dense-onnx-4bit"] / sizes["smollm2-dense-onnx-fp32"], 4),
        "dense_4bit_decode_vs_fp32_hub": (dense4.get("vs_dense_fp32") or {}).get("decode_speedup"),
        "fasp30_4bit_decode_vs_dense_4bit_hub": (fasp4.get("vs_dense") or {}).get("decode_speedup"),
        "dense_4bit_fits_hub_budget": (dense4.get("memory") or {}).get("verdict") == "within budget"
        if dense4 else None,
        "dense_4bit_perplexity_ratio": next(r["perplexity_ratio"] for r in table if r["bundle"] == "smollm2-dense-onnx-4bit"),
        "fasp30_4bit_perplexity_ratio": next(r["perplexity_ratio"] for r in table
                                             if r["bundle"] == "smollm2-fasp30-onnx-4bit"),
    }
    bars = {k: {"value": v, "bar": f"{BARS[k][0]} {BARS[k][1]}", "holds": holds(v, BARS[k])} for k, v in values.items()}
    result = {"command": "python benchmarks/onnx_4bit.py " + " ".join(sys.argv[1:]), "bundles": table, "bars": bars,
              "bench": str(bench_dir.relative_to(REPO)), "dense_4bit_hub_memory": dense4.get("memory"),
              "decode_tokens_per_s": {f"{b} {p}": r["metrics"]["decode_tokens_per_s"]["median"]
                                      for (b, p), r in rows.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx-4bit.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# 4-bit ONNX (`--quant 4bit`) against fp32 ONNX, SmolLM2-135M-Instruct (dequantized Q4_1)", "",
             "`.venv/bin/python benchmarks/onnx_4bit.py`: four bundles, each exported with `--max-context 512 "
             "--quality-text` WikiText-2 test (the 4-bit ones calibrated on WikiText-2 validation); quality = the "
             "artifact through ONNX Runtime, teacher-forced on 4 x 512 tokens of the test text, against the fp32 PyTorch "
             f"model it was made from; speed = `fasp-edge bench` of the four in one run ({args.rounds} rounds, fresh "
             f"processes), report in `{bench_dir.relative_to(REPO)}/bench.md`.", "",
             "| bundle | model MB | perplexity (PyTorch fp32) | perplexity ratio | top-1 agreement | "
             + " | ".join(f"{p} decode tok/s" for p in args.profiles.split(",")) + " | hub model memory MB |",
             "|---|---|---|---|---|" + "---|" * len(args.profiles.split(",")) + "---|"]
    for r in table:
        label = r["bundle"].removeprefix("smollm2-")
        speeds = " | ".join(f"{row(label, p)['metrics']['decode_tokens_per_s']['median']:.1f}" if row(label, p) else "–"
                            for p in args.profiles.split(","))
        mem = (row(label).get("memory") or {}).get("model_rss_mb", "–")
        lines.append(f"| {r['bundle']} | {r['model_mb']} | {r['perplexity']} ({r['reference_perplexity']}) | "
                     f"{r['perplexity_ratio']:.3f} | {r['top1_agreement']:.3f} | {speeds} | {mem} |")
    lines += ["", "| bar | value | holds |", "|---|---|---|"]
    for k, b in bars.items():
        v = b["value"]
        lines.append(f"| {k} {b['bar']} | {v if not isinstance(v, float) else round(v, 3)} | "
                     f"{'yes' if b['holds'] else 'NO' if b['holds'] is False else 'not measured'} |")
    (out / "onnx-4bit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
