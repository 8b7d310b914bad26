"""Quality and pruning-cost benchmark on SmolLM2-135M-Instruct (dequantized Q4_1).

Dense vs magnitude / wanda-sp / fasp at several sparsities; calibration on WikiText-2 VALIDATION
(128 x 512 tokens, seed 0), evaluation on WikiText-2 TEST (first N windows of 512 tokens).
Each configuration runs in a fresh process so that its peak RSS is its own.

    .venv/bin/python benchmarks/quality.py                 # full grid, about 40 minutes on 2 cores
    .venv/bin/python benchmarks/quality.py --methods fasp --sparsities 0.2 --windows 8   # quick look

Writes benchmarks/results/quality.json and quality.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASP_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIB = DATA / "wikitext2" / "wiki.valid.tokens"
TEST = DATA / "wikitext2" / "wiki.test.joined.txt"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(cfg: dict) -> dict:
    """One configuration, in this process: load, (calibrate, prune), evaluate."""
    import torch

    from fasp_edge import load_model, perplexity, prune
    from fasp_edge.pipeline.calibration import calibration_windows, read_text_file

    t0 = time.perf_counter()
    loaded = load_model()
    out = {**cfg, "load_seconds": round(time.perf_counter() - t0, 2), "rss_after_load_mb": round(_rss_mb(), 1)}
    model, tok = loaded.model, loaded.tokenizer
    if cfg["method"] != "dense":
        calib = calibration_windows(tok, file=CALIB, nsamples=cfg["nsamples"], seqlen=cfg["seqlen"], seed=0)
        r = prune(model, tok, sparsity=cfg["sparsity"], method=cfg["method"], calibration=calib.windows,
                  progress=False)
        rep = r.report()
        out.update({k: rep[k] for k in ("params_before", "params_after", "param_reduction",
                                         "nonembedding_params_before", "nonembedding_params_after",
                                         "nonembedding_param_reduction", "seconds", "timings")})
        out["prune_seconds"] = out.pop("seconds")
        out["peak_rss_prune_mb"] = round(_rss_mb(), 1)
    else:
        from fasp_edge.models import count_embedding_parameters, count_parameters, family_for

        n = count_parameters(model)
        out.update({"params_before": n, "params_after": n, "param_reduction": 0.0,
                    "nonembedding_params_after": n - count_embedding_parameters(family_for(model), model)})
    t0 = time.perf_counter()
    res = perplexity(model, tok, read_text_file(TEST), seqlen=512, max_windows=cfg["windows"], progress=False)
    out.update({"ppl": res["perplexity"], "windows": res["windows"], "eval_seconds": round(time.perf_counter() - t0, 1),
                "peak_rss_mb": round(_rss_mb(), 1), "threads": torch.get_num_threads()})
    return out


def host() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def markdown(rows: list[dict], windows: int) -> str:
    lines = [
        f"SmolLM2-135M-Instruct (dequantized Q4_1); WikiText-2 test perplexity, seqlen 512, first {windows} windows; "
        "calibration 128 x 512 tokens of WikiText-2 validation, seed 0.",
        "",
        "| method | sparsity | params | non-emb. params removed | ppl | prune s | forward s | stats s | solve s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.get("timings", {})
        lines.append(
            f"| {r['method']} | {r['sparsity']:.1f} | {r['params_after'] / 1e6:.1f}M | "
            f"{100 * r.get('nonembedding_param_reduction', 0):.1f}% | {r['ppl']:.2f} | "
            f"{r.get('prune_seconds', 0):.1f} | {t.get('forward', 0):.1f} | {t.get('statistics', 0):.1f} | "
            f"{t.get('solve', 0):.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="magnitude,wanda-sp,fasp")
    ap.add_argument("--sparsities", default="0.1,0.2,0.3")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    for f in (CALIB, TEST):
        if not f.exists():
            sys.exit(f"quality.py: {f} not found (set FASP_EDGE_SHARED_DATA)")
    common = {"windows": args.windows, "nsamples": args.nsamples, "seqlen": args.seqlen}
    configs = [{"method": "dense", "sparsity": 0.0, **common}]
    for s in [float(x) for x in args.sparsities.split(",")]:
        for m in args.methods.split(","):
            configs.append({"method": m, "sparsity": s, **common})
    rows = []
    for cfg in configs:
        print(f"running {cfg['method']} at {cfg['sparsity']} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"quality.py: {cfg} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  ppl {row['ppl']:.3f}  prune {row.get('prune_seconds', 0):.1f} s  peak RSS {row['peak_rss_mb']:.0f} MB",
              file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]), "host": host(), "runs": rows}
    (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "quality.md").write_text(markdown(rows, args.windows))
    print(markdown(rows, args.windows))


if __name__ == "__main__":
    main()
