"""Data-free calibration against WikiText-2 calibration, on SmolLM2-135M-Instruct with FASP.

For each sparsity, FASP is calibrated on the same token budget (NSAMPLES x SEQLEN) of
  - WikiText-2 VALIDATION text (windows drawn with seed 0), and
  - text sampled from the dense model itself (``self_generated_windows``: from BOS, temperature 1.0, seed 0),
and the pruned model is scored on
  - WikiText-2 TEST perplexity (first WINDOWS windows of 512 tokens),
  - agreement with the dense model (top-1 and mean KL) on held-out self-generated text (seed 1, never used
    for calibration): what `fasp-edge run` reports when no dataset is at hand,
  - agreement with the dense model on the WikiText-2 test windows.

    .venv/bin/python benchmarks/calibration.py          # about 20 minutes on 2 cores; run it alone

Writes benchmarks/results/calibration.json and calibration.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASP_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIB = DATA / "wikitext2" / "wiki.valid.tokens"
TEST = DATA / "wikitext2" / "wiki.test.joined.txt"
OUT = REPO / "benchmarks" / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.2,0.3")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32, help="WikiText-2 test windows of 512 tokens")
    ap.add_argument("--heldout", type=int, default=16, help="held-out self-generated sequences of 256 tokens")
    args = ap.parse_args()

    import torch

    from fasp_edge import load_model, perplexity, prune
    from fasp_edge.pipeline.calibration import (calibration_windows, read_text_file, self_generated_windows,
                                                tokenize_text)
    from fasp_edge.pipeline.perplexity import agreement

    torch.manual_seed(0)
    started = time.time()
    dense = load_model()
    tok = dense.tokenizer
    test_text = read_text_file(TEST)
    test_ids = tokenize_text(tok, test_text, add_special_tokens=False)
    test_windows = test_ids[: 8 * 512].reshape(8, 512)
    print("sampling held-out text and self-generated calibration from the dense model ...", file=sys.stderr)
    t0 = time.perf_counter()
    heldout = self_generated_windows(dense.model, tok, nsamples=args.heldout, seqlen=256, seed=1).windows
    t1 = time.perf_counter()
    self_cal = self_generated_windows(dense.model, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    self_seconds = time.perf_counter() - t1
    wiki_cal = calibration_windows(tok, file=CALIB, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    dense_ppl = perplexity(dense.model, tok, test_text, seqlen=512, max_windows=args.windows)["perplexity"]
    rows = [{"model": "dense", "calibration": "–", "sparsity": 0.0, "wikitext2_test_ppl": dense_ppl}]
    for s in [float(x) for x in args.sparsities.split(",")]:
        for name, cal in (("wikitext2-valid", wiki_cal), ("self-generated", self_cal)):
            print(f"fasp {s} calibrated on {name} ...", file=sys.stderr)
            fresh = load_model()
            t0 = time.perf_counter()
            res = prune(fresh.model, tok, sparsity=s, method="fasp", calibration=cal.windows)
            prune_s = time.perf_counter() - t0
            ppl = perplexity(fresh.model, tok, test_text, seqlen=512, max_windows=args.windows)["perplexity"]
            a_self = agreement(dense.model, fresh.model, heldout)
            a_wiki = agreement(dense.model, fresh.model, test_windows)
            rows.append({"model": f"fasp-{s:g}", "calibration": name, "sparsity": s,
                         "params_after": res.params_after, "prune_seconds": round(prune_s, 1),
                         "wikitext2_test_ppl": ppl,
                         "heldout_self_top1": a_self["top1_agreement"], "heldout_self_kl": a_self["mean_kl"],
                         "wikitext2_test_top1": a_wiki["top1_agreement"], "wikitext2_test_kl": a_wiki["mean_kl"]})
            print(f"  ppl {ppl:.2f}, agreement self {a_self['top1_agreement']:.3f} / wiki "
                  f"{a_wiki['top1_agreement']:.3f}", file=sys.stderr)
    doc = {"command": "python benchmarks/calibration.py " + " ".join(sys.argv[1:]),
           "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
           "settings": {"nsamples": args.nsamples, "seqlen": args.seqlen, "calibration_tokens": args.nsamples * args.seqlen,
                        "self_generated": self_cal.description, "self_generation_seconds": round(self_seconds, 1),
                        "test_windows": args.windows, "heldout": f"{args.heldout} x 256 tokens, seed 1, temperature 1.0",
                        "wikitext_agreement_windows": "first 8 x 512 tokens of WikiText-2 test"},
           "duration_s": round(time.time() - started, 1), "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "calibration.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"SmolLM2-135M-Instruct, FASP, calibration budget {args.nsamples} x {args.seqlen} tokens for both sources. "
             f"Perplexity: WikiText-2 test, first {args.windows} windows of 512. Agreement with the dense model: top-1 "
             f"share and mean KL(dense || pruned) in nats, on {args.heldout} x 256 held-out self-generated tokens "
             "(seed 1) and on the first 8 x 512 WikiText-2 test tokens. Command: `" + doc["command"].strip() + "`.", "",
             "| model | calibration | test ppl | top-1 (held-out self-gen) | KL (self-gen) | top-1 (WikiText-2 test) | "
             "KL (WikiText-2 test) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k, d=3: f"{r[k]:.{d}f}" if k in r else "–"  # noqa: E731
        lines.append(f"| {r['model']} | {r['calibration']} | {r['wikitext2_test_ppl']:.2f} | {f('heldout_self_top1')} | "
                     f"{f('heldout_self_kl')} | {f('wikitext2_test_top1')} | {f('wikitext2_test_kl')} |")
    (OUT / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
