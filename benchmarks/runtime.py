"""Runtime benchmark: SmolLM2-135M-Instruct dense vs FASP-0.3 (``--align 32``) on ExecuTorch fp32, ExecuTorch
8da4w, ONNX Runtime fp32 and PyTorch eager, under the `hub` and `phone-mid` profiles, plus optimum-onnx's export
of the dense model as the reference for our ONNX export, and ExecuTorch's stock `TextLLMRunner` (the C++ runner
Android's LlmModule wraps) on every .pte bundle, 2 threads, in the same run.

    .venv/bin/python benchmarks/runtime.py      # ~30 min on 2 cores once the bundles exist; run it alone

Needs the bundles of `benchmarks/export.py` (bundles/smollm2-{dense,fasp30}-{pte-fp32,pte-8da4w,onnx-fp32});
makes the optimum export (bundles/smollm2-dense-optimum-onnx) if absent. Runs `fasp-edge bench` into
benchmarks/results/runtime/ (bench.json, bench.md, plots) and writes benchmarks/results/runtime.{json,md}
with issue 11's bars, every ratio a pruned artifact against the dense artifact of the same backend and
precision, measured in the same run:
  - FASP-0.3 pte 8da4w decode >= 1.25x dense pte 8da4w (fasp-edge bench and TextLLMRunner);
  - FASP-0.3 pte fp32 decode >= 1.20x dense pte fp32 (both);
  - dense pte 8da4w decode >= 1.5x llama.cpp Q4_0: not measured (no llama.cpp row yet);
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
MODELS = ("dense", "fasp30")
VARIANTS = ("pte-fp32", "pte-8da4w", "onnx-fp32")
BARS = {"fasp30_pte_8da4w_decode_vs_dense_pte_8da4w": 1.25, "fasp30_pte_fp32_decode_vs_dense_pte_fp32": 1.20,
        "our_onnx_decode_vs_optimum": 1.0}
#: the stock runner: one fresh process per bundle and round, ExecuTorch's thread pool at 2, greedy, EOS ignored
RUNNER = """
import json, sys
from fasp_edge.export.executorch import load_runtime_ops, set_threadpool_size
load_runtime_ops(); set_threadpool_size(2)
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
folder = sys.argv[1]
m = json.load(open(folder + "/manifest.json"))
pte = m["artifacts"]["pte"]
data = folder + "/" + pte["data_file"] if pte.get("data_file") else None
runner = TextLLMRunner(folder + "/" + pte["file"], folder + "/" + m["tokenizer"]["runner_tokenizer"], data)
stats = []
cfg = GenerationConfig(max_new_tokens=64, temperature=0.0, echo=False, num_bos=int(m["tokenizer"]["add_bos"]),
                       )
for _ in range(3):
    runner.reset()
    runner.generate("The history of the city begins", cfg, token_callback=lambda t: None,
                    stats_callback=lambda s: stats.append(json.loads(s.to_json_string())))
print(json.dumps(stats))
"""


def _runner_decode(folder: Path, rounds: int) -> list[float]:
    """Decode tokens/s of ExecuTorch's TextLLMRunner on ``folder``: after the first token, 3 generations per
    fresh process (the first a warm-up), ``rounds`` processes."""
    out = []
    for _ in range(rounds):
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(folder)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        if proc.returncode != 0:
            sys.exit(f"runtime.py: TextLLMRunner on {folder} failed:\n{proc.stderr[-2000:]}")
        for st in json.loads(proc.stdout.strip().splitlines()[-1])[1:]:
            unit = st["SCALING_FACTOR_UNITS_PER_SECOND"]
            out.append((st["generated_tokens"] - 1) / ((st["inference_end_ms"] - st["first_token_ms"]) / unit))
    return out


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
    runner_file = out / "runtime" / "text_llm_runner.json"
    if not args.summarize_only:
        print(" ".join(cmd[2:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        runner = {}
        for b in bundles:
            if (b / "model.pte").is_file():
                print(f"TextLLMRunner {b.name} ...", file=sys.stderr, flush=True)
                vals = sorted(_runner_decode(b, args.rounds))
                runner[b.name] = {"median": vals[len(vals) // 2], "values": [round(v, 2) for v in vals]}
        runner_file.write_text(json.dumps(runner, indent=2) + "\n")
    runner = json.loads(runner_file.read_text())
    doc = json.loads((out / "runtime" / "bench.json").read_text())
    rows = {(r["bundle"], r["backend"], r["profile"]): r for r in doc["results"] if r["status"] == "ok"}

    def decode(bundle: str, backend: str, profile: str) -> float | None:
        r = rows.get((f"smollm2-{bundle}", backend, profile))
        return r["metrics"]["decode_tokens_per_s"]["median"] if r else None

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    def stock(bundle: str) -> float | None:
        return (runner.get(f"smollm2-{bundle}") or {}).get("median")

    pairs = {"fasp30_pte_8da4w_decode_vs_dense_pte_8da4w": ("fasp30-pte-8da4w", "dense-pte-8da4w"),
             "fasp30_pte_fp32_decode_vs_dense_pte_fp32": ("fasp30-pte-fp32", "dense-pte-fp32")}
    bars: dict[str, dict] = {}
    for prof in args.profiles.split(","):
        got = {k: ratio(decode(a, "pte", prof), decode(b, "pte", prof)) for k, (a, b) in pairs.items()}
        got["our_onnx_decode_vs_optimum"] = ratio(decode("dense-onnx-fp32", "onnx", prof),
                                                  decode("dense-optimum-onnx", "onnx", prof))
        bars[prof] = {k: {"value": v, "bar": BARS[k], "met": v is not None and v >= BARS[k]} for k, v in got.items()}
    bars["TextLLMRunner, 2 threads"] = {k: {"value": ratio(stock(a), stock(b)), "bar": BARS[k],
                                            "met": (ratio(stock(a), stock(b)) or 0) >= BARS[k]}
                                        for k, (a, b) in pairs.items()}
    bars["not measured"] = {"dense_pte_8da4w_decode_vs_llama_cpp_q4_0": {"value": None, "bar": 1.5, "met": False}}
    summary = {"command": "python benchmarks/runtime.py " + " ".join(a for a in sys.argv[1:] if a != "--summarize-only"),
               "bench_command": "fasp-edge " + " ".join(cmd[3:]).replace(str(REPO) + "/", ""),
               "host": doc["host"], "bars": bars, "text_llm_runner_decode_tokens_per_s": runner}
    (out / "runtime.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = [f"SmolLM2-135M-Instruct, context 512; {doc['host']['cpu_model']}, {doc['host']['usable_cpus']} usable CPUs; "
             f"median of {doc['settings']['reps']} runs after a warm-up in each of {doc['settings']['rounds']} fresh "
             "processes per row (rounds interleaved over all rows).", "",
             "| profile | backend | model | decode tok/s | vs dense (same backend, precision) | TTFT ms | model MB | budget | size MB |",
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
    lines += ["", "ExecuTorch's stock TextLLMRunner, 2 threads, 64 greedy tokens, median decode tok/s (same run): "
              + ", ".join(f"{k.removeprefix('smollm2-')} {v['median']:.1f}" for k, v in runner.items()), "",
              "Bars (same run):", ""]
    for prof, b in bars.items():
        for k, v in b.items():
            lines.append(f"- {prof}: {k} = {v['value']} (bar >= {v['bar']}: {'met' if v['met'] else 'NOT met'})")
    (out / "runtime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
