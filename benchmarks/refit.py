"""The restoration's damping and statistics, measured: FASP's refit variants against each other and wanda-sp.

    .venv/bin/python benchmarks/refit.py                 # ~60 min on 2 cores (7 prunes of SmolLM2 at 0.2)
    .venv/bin/python benchmarks/refit.py --only obs        # one variant; the others' rows are kept

SmolLM2-135M-Instruct (dequantized Q4_1) pruned at sparsity 0.2 (``--align 1``) with 128 x 512 tokens of
WikiText-2 validation (seed 0), each variant by `fasp-edge prune` in its own process, then `fasp-edge eval` on the
first 64 windows of 512 tokens of WikiText-2 test and of the Brown corpus (a second domain). Nothing is chosen on
either: ``--damp auto`` chooses λ per pair on every 4th calibration window, held out of its fit.

Variants: the refit before these measurements made it the default (ridge toward zero, λ = 0.01, column score),
``--damp auto`` (ridge, λ per pair), ``--damp auto --refit-prior original`` (damped toward the kept weights),
the old refit with ``--sequential-stats``, the last two together, the default now (the same plus OBS channel
selection), and wanda-sp (the score's selection, no refit). Every variant spells out its refit, so the rows keep
their meaning whatever the defaults. Checkpoints and evaluations land in ``--work`` (default out/refit); one
already there is reused, not redone. With ``--only``, the rows of other variants are kept from the results file.
Writes benchmarks/results/refit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fasp_edge.fsutil import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASP_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIB = DATA / "wikitext2" / "wiki.valid.tokens"
TEXTS = {"wiki": DATA / "wikitext2" / "wiki.test.joined.txt", "brown": DATA / "brown" / "brown.txt"}
SPARSITY = 0.2
OLD = ["--damp", "0.01", "--refit-prior", "zero", "--selection", "score"]  # the refit before the defaults changed
VARIANTS = {
    "default": ("ridge toward zero, λ = 0.01 (the default before)", OLD),
    "auto-zero": ("ridge toward zero, λ per pair on held-out windows",
                  ["--damp", "auto", "--refit-prior", "zero", "--selection", "score"]),
    "auto-original": ("damped toward the kept weights, λ per pair on held-out windows",
                      ["--damp", "auto", "--refit-prior", "original", "--selection", "score"]),
    "seq": ("the old refit, MLP statistics through the pruned attention", [*OLD, "--sequential-stats"]),
    "auto-original-seq": ("both", ["--damp", "auto", "--refit-prior", "original", "--selection", "score",
                                   "--sequential-stats"]),
    "obs": ("the default now: auto-original with OBS channel selection", []),
    "wanda-sp": ("the score's selection, no refit", ["--method", "wanda-sp"]),
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fasp_edge.cli", "-q", *args], capture_output=True, text=True,
                          check=True)


def evaluate(model: Path | None, work: Path, name: str) -> dict[str, float]:
    out = {}
    for text, path in TEXTS.items():
        f = work / f"{name}.{text}.json"
        if not f.is_file():
            proc = _cli("eval", *([str(model)] if model else []), "--text-file", str(path), "--max-windows", "64",
                        "--json")
            atomic_write_text(f, proc.stdout)
        out[text] = json.loads(f.read_text())["perplexity"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(REPO / "out" / "refit"))
    ap.add_argument("--only", default=None, help="comma-separated variants (default: all)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(VARIANTS)
    dense = evaluate(None, work, "dense")
    rows = []
    for name in names:
        what, flags = VARIANTS[name]
        ckpt = work / name
        if not (ckpt / "fasp_report.json").is_file():
            print(f"pruning {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            _cli("prune", "--sparsity", str(SPARSITY), "--calib-file", str(CALIB), "--nsamples", "128", "--seqlen",
                 "512", "-o", str(ckpt), "--overwrite", *flags)
            (work / f"{name}.prune.log").write_text(f"{time.perf_counter() - t0:.2f} s\n")
        report = json.loads((ckpt / "fasp_report.json").read_text())
        ppl = evaluate(ckpt, work, name)
        rows.append({"variant": name, "what": what, "flags": flags,
                     **{f"{t}_ratio": round(ppl[t] / dense[t], 4) for t in TEXTS},
                     **{f"{t}_perplexity": round(ppl[t], 3) for t in TEXTS},
                     "prune_seconds": round(report["seconds"], 1), "timings": report["timings"],
                     "damp_chosen": report.get("damp_chosen")})
        print(f"{name:18s} wiki {rows[-1]['wiki_ratio']:.3f}x  brown {rows[-1]['brown_ratio']:.3f}x  "
              f"{report['seconds']:.0f} s", file=sys.stderr, flush=True)
    out = Path(args.out)
    if args.only and (out / "refit.json").is_file():  # keep the other variants' rows from the last full run
        kept = {r["variant"]: r for r in json.loads((out / "refit.json").read_text())["rows"]}
        ran = {r["variant"]: r for r in rows}
        rows = [ran.get(v) or {**kept[v], "what": VARIANTS[v][0], "flags": VARIANTS[v][1]}
                for v in VARIANTS if v in ran or v in kept]
    atomic_write_text(out / "refit.json",
                      json.dumps({"sparsity": SPARSITY, "dense": dense, "rows": rows}, indent=2) + "\n")
    lines = [f"SmolLM2-135M-Instruct (dequantized Q4_1) at sparsity {SPARSITY}, calibration 128 x 512 tokens of "
             "WikiText-2 validation; perplexity / dense on the first 64 x 512 tokens of WikiText-2 test "
             f"(dense {dense['wiki']:.2f}) and of the Brown corpus (dense {dense['brown']:.2f}) "
             "(`benchmarks/refit.py`).", "",
             "| variant | flags | WikiText-2 test | Brown | prune s | forward s | solve s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']}: {r['what']} | `{' '.join(r['flags']) or '(none)'}` | {r['wiki_ratio']:.3f} | "
                     f"{r['brown_ratio']:.3f} | {r['prune_seconds']:.0f} | {r['timings']['forward']:.0f} | "
                     f"{r['timings']['solve']:.0f} |")
    atomic_write_text(out / "refit.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
