"""Runtime benchmark: SmolLM2-135M-Instruct dense vs FASP 0.2 and 0.3 on ExecuTorch fp32, ExecuTorch 8da4w,
ONNX Runtime fp32 and PyTorch eager, under the `hub` and `phone-mid` profiles, plus optimum-onnx's export
of the dense model as the reference for our ONNX export.

    .venv/bin/python benchmarks/runtime.py      # ~35 min on 2 cores once the bundles exist; run it alone

Needs the bundles of `benchmarks/export.py` (bundles/smollm2-{dense,fasp20,fasp30}-{pte-fp32,pte-8da4w,onnx-fp32});
makes the optimum export (bundles/smollm2-dense-optimum-onnx) if absent. Runs `fasp-edge bench` into
benchmarks/results/runtime/ (bench.json, bench.md, plots) and writes benchmarks/results/runtime.{json,md}
with the bars, all ratios from the same run:
  - FASP-0.3 decode tokens/s >= 1.15x dense on ExecuTorch fp32;
  - ExecuTorch 8da4w (dense) decode >= 1.5x ExecuTorch fp32 dense;
  - our ONNX export's decode >= optimum-onnx's (dense, same profile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("dense", "fasp20", "fasp30")
VARIANTS = ("pte-fp32", "pte-8da4w", "onnx-fp32")
BARS = {"fasp30_pte_fp32_decode_vs_dense": 1.15, "dense_pte_8da4w_decode_vs_fp32": 1.5,
        "our_onnx_decode_vs_optimum": 1.0}


def _optimum_export(out: Path) -> None:
    from fasp_edge.models.loading import default_model_folder

    src = default_model_folder()
    print(f"exporting the dense model with optimum-onnx into {out} ...", file=sys.stderr, flush=True)
    tmp = out.with_name(out.name + ".tmp")
    proc = subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "-m", str(src),
                           "--task", "text-generation-with-past", str(tmp)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"runtime.py: optimum export failed:\n{proc.stderr[-3000:]}")
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", default=str(REPO / "bundles"))
    ap.add_argument("--profiles", default="hub,phone-mid")
    ap.add_argument("--backends", default="pte,onnx,torch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="fresh-process rounds over all rows, pooled (default 3)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--summarize-only", action="store_true",
                    help="rebuild runtime.json/md from an existing results/runtime/bench.json without measuring")
    args = ap.parse_args()
    root = Path(args.bundles)
    bundles = [root / f"smollm2-{m}-{v}" for m in MODELS for v in VARIANTS]
    missing = [str(b) for b in bundles if not (b / "manifest.json").is_file()]
    if missing:
        sys.exit("runtime.py: missing bundles (make them with `python benchmarks/export.py --reuse`): "
                 + ", ".join(missing))
    optimum = root / "smollm2-dense-optimum-onnx"
    if not (optimum / "model.onnx").is_file() and not args.summarize_only:
        _optimum_export(optimum)
    out = Path(args.out)
    cmd = [sys.executable, "-m", "fasp_edge.cli", "bench", *map(str, bundles), "--optimum-onnx", str(optimum),
           "--profiles", args.profiles, "--backends", args.backends, "--reps", str(args.reps), "--rounds", str(args.rounds),
           "-o", str(out / "runtime"), "--overwrite"]
    if not args.summarize_only:
        print(" ".join(cmd[2:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    doc = json.loads((out / "runtime" / "bench.json").read_text())
    rows = {(r["bundle"], r["backend"], r["profile"]): r for r in doc["results"] if r["status"] == "ok"}

    def decode(bundle: str, backend: str, profile: str) -> float | None:
        r = rows.get((f"smollm2-{bundle}", backend, profile))
        return r["metrics"]["decode_tokens_per_s"]["median"] if r else None

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    bars: dict[str, dict] = {}
    for prof in args.profiles.split(","):
        got = {
            "fasp30_pte_fp32_decode_vs_dense": ratio(decode("fasp30-pte-fp32", "pte", prof),
                                                     decode("dense-pte-fp32", "pte", prof)),
            "dense_pte_8da4w_decode_vs_fp32": ratio(decode("dense-pte-8da4w", "pte", prof),
                                                    decode("dense-pte-fp32", "pte", prof)),
            "our_onnx_decode_vs_optimum": ratio(decode("dense-onnx-fp32", "onnx", prof),
                                                decode("dense-optimum-onnx", "onnx", prof)),
        }
        bars[prof] = {k: {"value": v, "bar": BARS[k], "met": v is not None and v >= BARS[k]} for k, v in got.items()}
    summary = {"command": "python benchmarks/runtime.py " + " ".join(a for a in sys.argv[1:] if a != "--summarize-only"),
               "bench_command": "fasp-edge " + " ".join(cmd[3:]).replace(str(REPO) + "/", ""),
               "host": doc["host"], "bars": bars}
    (out / "runtime.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = [f"SmolLM2-135M-Instruct, context 512; {doc['host']['cpu_model']}, {doc['host']['usable_cpus']} usable CPUs; "
             f"median of {doc['settings']['reps']} runs after a warm-up in each of {doc['settings']['rounds']} fresh "
             "processes per row (rounds interleaved over all rows).", "",
             "| profile | backend | model | decode tok/s | vs dense fp32 | TTFT ms | model MB | budget | size MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        if r["status"] != "ok":
            continue
        v = r.get("vs_dense") or {}
        speed = f"{v['decode_speedup']:.2f}x" if v.get("decode_speedup") else "–" if "optimum" in r["bundle"] else "ref"
        model = r["bundle"].removeprefix("smollm2-")
        if r["backend"] == "torch":  # measured once per source model, under its first bundle
            model = model.split("-")[0] + " (PyTorch checkpoint)"
        lines.append(f"| {r['profile']} | {r['backend']} | {model} | "
                     f"{r['metrics']['decode_tokens_per_s']['median']:.1f} | {speed} | "
                     f"{1000 * r['metrics']['ttft_s']['median']:.0f} | {r['memory']['model_rss_mb']:.0f} | "
                     f"{'fits' if r['memory']['verdict'] == 'within budget' else 'over'} ({r['memory']['budget_mb']}) | "
                     f"{r['artifact_bytes'] / 1e6:.0f} |")
    lines += ["", "Bars (same run):", ""]
    for prof, b in bars.items():
        for k, v in b.items():
            lines.append(f"- {prof}: {k} = {v['value']} (bar >= {v['bar']}: {'met' if v['met'] else 'NOT met'})")
    (out / "runtime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
