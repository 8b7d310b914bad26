"""Check once that fasp-edge's task scoring equals lm-evaluation-harness's own HFLM, document by document.

Both score the same model object (default: the embedded SmolLM2-135M-Instruct) on the same seeded subset of
each task; the script records, per task, how many documents get the same choice (argmax log-likelihood,
lm-eval's ``acc`` decision) and the largest |Δ log-likelihood| over all choices, to
``benchmarks/results/tasks-harness-check.json``.

    .venv/bin/python benchmarks/tasks_harness_check.py --limit 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tasks-harness-check.json"))
    args = ap.parse_args()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from fasp_edge.checkpoints.loading import load_model
    from fasp_edge.pipeline.tasks import TorchScorer, evaluate_tasks, load_tasks, parse_tasks, subset

    names = parse_tasks(args.tasks)
    loaded = load_model(args.model)
    t0 = time.perf_counter()
    ours = evaluate_tasks(TorchScorer(loaded.model), loaded.tokenizer, names, limit=args.limit, seed=0)
    ours_s = time.perf_counter() - t0
    tasks = load_tasks(names)
    samples = {n: subset(len(t.eval_docs), args.limit, 0) or list(range(len(t.eval_docs))) for n, t in tasks.items()}
    t0 = time.perf_counter()
    with torch.no_grad():
        theirs = simple_evaluate(model=HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1),
                                 tasks=list(tasks.values()), samples=samples, log_samples=True)
    theirs_s = time.perf_counter() - t0
    report = {"model": loaded.source, "limit": args.limit, "seed": 0, "seconds": {"fasp-edge": round(ours_s, 1),
              "lm-eval HFLM": round(theirs_s, 1)}, "tasks": {}}
    for name in names:
        logged = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        their_choices = [max(range(len(s["filtered_resps"])), key=lambda j, s=s: float(s["filtered_resps"][j][0]))
                         for s in logged]
        same = sum(a == b for a, b in zip(ours["choices"][name], their_choices))
        delta = max(abs(a - float(r[0])) for doc, s in zip(ours["loglikelihoods"][name], logged)
                    for a, r in zip(doc, s["filtered_resps"]))
        metrics = {m: (ours["tasks"][name][m], float(theirs["results"][name][f"{m},none"]))
                   for m in ("acc", "acc_norm") if m in ours["tasks"][name]}
        report["tasks"][name] = {"documents": len(logged), "same_choice": same, "max_abs_loglik_delta": delta,
                                 "metrics (fasp-edge, lm-eval)": metrics}
        print(f"{name}: {same}/{len(logged)} same choices, max |Δ log-likelihood| {delta:.2e}; {metrics}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.rename(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
