"""Peak memory of a quantized export, stage by stage: a copy of the model (``keep_model=True``, what a library caller
gets by default) against quantizing it in place (``keep_model=False``, what ``fasp-edge export`` does).

A randomly initialised Qwen2 of a given shape (weights do not change memory) is exported as ``pte`` 8da4w and as
``onnx`` 4bit, each configuration in its own process so that its peak RSS is its own. A sampler thread reads the
process's RSS every 50 ms; the export's main steps are wrapped so that each reports the peak reached inside it.
The parity prompt, one quality window of random tokens and 8 calibration windows of random tokens keep the
shapes of a real export without a tokenizer. Writes benchmarks/results/export-memory.{json,md}.

    .venv/bin/python benchmarks/export_memory.py                    # 117M parameters (0.47 GB fp32): ~20 min on 2 cores
    .venv/bin/python benchmarks/export_memory.py --hidden 1536 --ffn 8960 --layers 2 --vocab 151936
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: (module, function) of fasp_edge.export whose peak RSS is reported
STEPS = [("bundle", "_check_decoder"), ("bundle", "quantize_decoder"), ("bundle", "export_pte"),
         ("onnx", "quantize_blockwise"), ("onnx", "export_onnx"), ("onnx", "write_block_quantized"),
         ("bundle", "logits_parity"), ("bundle", "artifact_quality")]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(args) -> dict:
    """One export in this process: the peak RSS inside each step and overall (MB)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import fasp_edge.export.bundle as bundle
    import fasp_edge.export.onnx as onnx_export
    from fasp_edge.checkpoints.loading import LoadedModel

    peak = {"now": _rss_mb(), "all": _rss_mb()}

    def sample():
        while True:
            r = _rss_mb()
            peak["now"], peak["all"] = max(peak["now"], r), max(peak["all"], r)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    steps: dict[str, float] = {}
    for mod_name, fn_name in STEPS:
        mod = bundle if mod_name == "bundle" else onnx_export
        real = getattr(mod, fn_name)

        def wrapped(*a, _real=real, _name=fn_name, **k):
            peak["now"] = _rss_mb()
            try:
                return _real(*a, **k)
            finally:
                steps[_name] = round(max(steps.get(_name, 0.0), peak["now"], _rss_mb()), 1)

        setattr(mod, fn_name, functools.wraps(real)(wrapped))

    class Tok:  # what a bundle needs of a tokenizer
        bos_token_id, eos_token_id, chat_template, is_fast = 1, 2, None, False

        def __call__(self, text, add_special_tokens=True):
            return type("R", (), {"input_ids": [1] + [3 + ord(c) % 90 for c in text]})()

        def save_pretrained(self, folder):
            Path(folder, "tokenizer_config.json").write_text("{}")

    before_model = _rss_mb()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                      tie_word_embeddings=False, max_position_embeddings=4096)
    model = Qwen2ForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    loaded_rss = _rss_mb()
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bundle.export_bundle(LoadedModel(model, Tok(), "random-qwen2"), Path(tmp) / "b", formats=[args.format],
                             quant=args.quant, max_context=256, progress=False, keep_model=args.keep == "copy",
                             quality_tokens=torch.randint(3, args.vocab, (1, 256), generator=g),
                             calibration=torch.randint(3, args.vocab, (8, 256), generator=g))
        seconds = time.perf_counter() - t0
    return {"format": args.format, "quant": args.quant, "model": args.keep, "parameters": params,
            "fp32_mb": round(4 * params / 2**20, 1), "rss_before_model_mb": round(before_model, 1),
            "rss_model_loaded_mb": round(loaded_rss, 1), "peak_mb": round(peak["all"], 1),
            "peak_over_loaded_mb": round(peak["all"] - loaded_rss, 1), "step_peak_mb": steps,
            "seconds": round(seconds, 1)}


def markdown(doc: dict) -> str:
    r0 = doc["rows"][0]
    lines = [f"# Export peak memory: a copy of the model against quantizing it in place", "",
             f"`{doc['command']}` ({doc['date']}, {doc['machine']}); a random Qwen2 of {r0['parameters'] / 1e6:.0f}M "
             f"parameters ({r0['fp32_mb']:.0f} MB fp32), each export in its own process, RSS sampled every 50 ms.", "",
             "| artifact | model | peak RSS MB | over the loaded model MB | x fp32 model | " +
             " | ".join(n for _, n in STEPS) + " | seconds |", "|---|---|---|---|---|" + "---|" * len(STEPS) + "---|"]
    for r in doc["rows"]:
        cells = [f"{r['step_peak_mb'][n]:.0f}" if n in r["step_peak_mb"] else "–" for _, n in STEPS]
        lines.append(f"| {r['format']} {r['quant']} | {r['model']} | {r['peak_mb']:.0f} | {r['peak_over_loaded_mb']:.0f} | "
                     f"{r['peak_over_loaded_mb'] / r['fp32_mb']:.2f} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--child", nargs=3, metavar=("FORMAT", "QUANT", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.format, args.quant, args.keep = args.child
        print(json.dumps(child(args)))
        return
    from fasp_edge.fsutil import atomic_write_text

    shape = ["--hidden", str(args.hidden), "--ffn", str(args.ffn), "--layers", str(args.layers), "--vocab", str(args.vocab)]
    rows = []
    for fmt, quant in (("pte", "8da4w"), ("onnx", "4bit")):
        for keep in ("copy", "in place"):
            print(f"{fmt} {quant}, model {keep} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, *shape, "--child", fmt, quant, keep], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                raise SystemExit(f"the {fmt} {quant} export ({keep}) failed: {out.stderr.strip().splitlines()[-1:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  peak {rows[-1]['peak_mb']:.0f} MB", file=sys.stderr)
    doc = {"command": "benchmarks/export_memory.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} cores",
           "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "export-memory.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(RESULTS / "export-memory.md", markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
