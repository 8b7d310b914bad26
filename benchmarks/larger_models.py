"""Larger models: Qwen2.5-Coder 0.5B and 1.5B (dequantized Q4_K_M), pruned at a 20% parameter cut and measured.

Needs the models fetched once (`fasp-edge models fetch qwen2.5-0.5b`, `... qwen2.5-1.5b`); a model that is absent
is skipped with the reason. Calibration and evaluation texts come from benchmarks/corpora.py: calibration on
WikiText-2 validation + standard-library modules a-m (calib-mixed), evaluation on WikiText-2 test (English) and
standard-library modules n-z (code); no file is in both.

Stages (each step runs `fasp-edge` in a fresh process, so its peak RSS, read with wait4, is its own; each row
lands in --work as it finishes and is reused on the next run unless --fresh):

- ``prune``: FASP (the library's defaults: error-curve allocation, refit damped toward the kept weights with λ
  on held-out windows, OBS selection) and wanda-sp (the same allocation, no refit) at ``--param-reduction``,
  ``--align 32``, ``--nsamples`` x ``--seqlen`` calibration tokens; records wall time, peak RSS and the prune
  report's stage timings;
- ``quality``: perplexity of dense, FASP and wanda-sp on the English and the code test text (``--windows`` x 512
  tokens from the start of each), through PyTorch.

    .venv/bin/python benchmarks/larger_models.py --models qwen2.5-1.5b --methods fasp --stages prune
    .venv/bin/python benchmarks/larger_models.py              # every model, method and stage

Writes benchmarks/results/larger-models.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpora  # noqa: E402

from fasp_edge.checkpoints import registry  # noqa: E402
from fasp_edge.fsutil import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b")
METHODS = ("fasp", "wanda-sp")
STAGES = ("prune", "quality")


def run_measured(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` with its output to ``log_path``; its exit status, wall seconds and peak RSS (its own, by wait4)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "command": " ".join(cmd[2:] if cmd[1] == "-m" else cmd)}


def _cli() -> list[str]:
    return [sys.executable, "-m", "fasp_edge.cli"]


def checkpoint(work: Path, model: str, method: str, reduction: float) -> Path:
    return work / f"{model}-{method}-r{round(100 * reduction)}"


def prune_row(args, work: Path, texts: dict, model: str, method: str) -> dict:
    out = checkpoint(work, model, method, args.param_reduction)
    cmd = _cli() + ["prune", model, "--method", method, "--param-reduction", str(args.param_reduction),
                    "--align", "32", "--calib-file", texts["calib-mixed"]["path"], "--nsamples", str(args.nsamples),
                    "--seqlen", str(args.seqlen), "-o", str(out), "--overwrite"]
    res = run_measured(cmd, work / f"{out.name}.prune.log")
    if res["rc"] != 0:
        raise SystemExit(f"prune failed ({res['command']}); see {work / (out.name + '.prune.log')}")
    report = json.loads((out / "fasp_report.json").read_text())
    keep = ("params_before", "params_after", "param_reduction", "seconds", "timings", "load_seconds")
    return {"model": model, "method": method, "checkpoint": str(out), **res,
            "report": {k: report[k] for k in keep if k in report}}


def quality_row(args, work: Path, texts: dict, model: str, method: str) -> dict:
    source = model if method == "dense" else str(checkpoint(work, model, method, args.param_reduction))
    row = {"model": model, "method": method, "windows": args.windows, "seqlen": 512}
    for name, path in (("english", str(corpora.WIKI_TEST)), ("code", texts["code-test"]["path"])):
        cmd = _cli() + ["--quiet", "eval", source, "--text-file", path, "--seqlen", "512", "--max-windows",
                        str(args.windows), "--json"]
        if name == "english" and args.tasks:
            cmd += ["--tasks", args.tasks, "--limit", str(args.task_limit)]
        log_path = work / f"{model}-{method}.eval-{name}.log"
        res = run_measured(cmd, log_path)
        if res["rc"] != 0:
            raise SystemExit(f"eval failed ({res['command']}); see {log_path}")
        out = json.loads(log_path.read_text().strip().splitlines()[-1])
        row[name] = {"perplexity": out["perplexity"], "seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"]}
        if "tasks" in out:
            row["tasks"] = out["tasks"]
    return row


def cached(work: Path, key: str, fresh: bool, make) -> dict:
    path = work / f"{key}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    row = make()
    atomic_write_text(path, json.dumps(row, indent=1) + "\n")
    return row


def markdown(doc: dict) -> str:
    lines = [f"# Larger models (dequantized Q4_K_M): a {round(100 * doc['param_reduction'])}% parameter cut",
             "", f"`{doc['command']}` ({doc['date']}, {doc['machine']})", "",
             f"Calibration: {doc['nsamples']} x {doc['seqlen']} tokens of calib-mixed (WikiText-2 validation + "
             "stdlib modules a-m); evaluation: WikiText-2 test and stdlib modules n-z (benchmarks/corpora.py).", ""]
    if doc["prune"]:
        lines += ["## Pruning cost", "", "| model | method | parameters | removed | wall s | peak RSS MB | "
                  "load s | allocation s | forward s | statistics s | solve s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in doc["prune"]:
            rep, t = r["report"], r["report"].get("timings", {})
            lines.append(f"| {r['model']} | {r['method']} | {rep.get('params_before', 0) / 1e6:.0f}M -> "
                         f"{rep.get('params_after', 0) / 1e6:.0f}M | {100 * rep.get('param_reduction', 0):.1f}% | "
                         f"{r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | {rep.get('load_seconds', 0):.0f} | "
                         f"{t.get('allocation', 0):.0f} | {t.get('forward', 0):.0f} | {t.get('statistics', 0):.0f} | {t.get('solve', 0):.0f} |")
        lines.append("")
    if doc["quality"]:
        lines += ["## Perplexity (PyTorch, fp32 weights)", "",
                  "| model | method | English (WikiText-2 test) | vs dense | code (stdlib n-z) | vs dense |",
                  "|---|---|---|---|---|---|"]
        dense = {r["model"]: r for r in doc["quality"] if r["method"] == "dense"}
        for r in doc["quality"]:
            d = dense.get(r["model"])
            ratio = {k: f"{r[k]['perplexity'] / d[k]['perplexity']:.3f}x" if d else "" for k in ("english", "code")}
            lines.append(f"| {r['model']} | {r['method']} | {r['english']['perplexity']:.3f} | {ratio['english']} | "
                         f"{r['code']['perplexity']:.3f} | {ratio['code']} |")
        lines.append(f"\n{doc['quality'][0]['windows']} windows of 512 tokens from the start of each text.")
        names = sorted({t for r in doc["quality"] for t in (r.get("tasks") or {}).get("tasks", {})})
        if names:
            first = next(r["tasks"] for r in doc["quality"] if r.get("tasks"))
            lines += ["", f"## Zero-shot accuracy (PyTorch; at most {first['limit']} documents per task, seed "
                      f"{first['seed']}; ± standard error)", "",
                      "| model | method | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
            for r in doc["quality"]:
                t = (r.get("tasks") or {}).get("tasks", {})
                cells = [f"{t[n]['acc']:.3f} ± {t[n]['acc_stderr']:.3f}" if n in t else "–" for n in names]
                lines.append(f"| {r['model']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--param-reduction", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens per text")
    ap.add_argument("--tasks", default="piqa", help="zero-shot tasks scored with the English text ('' = none)")
    ap.add_argument("--task-limit", type=int, default=100, help="documents per task (a subset drawn with seed 0)")
    ap.add_argument("--work", default=str(REPO / "out" / "larger"))
    ap.add_argument("--fresh", action="store_true", help="redo rows already in --work")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    texts = corpora.build(work / "corpora")
    stages = args.stages.split(",")
    doc = {"command": "benchmarks/larger_models.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "param_reduction": args.param_reduction,
           "nsamples": args.nsamples, "seqlen": args.seqlen, "texts": texts, "skipped": [], "prune": [], "quality": []}
    for model in args.models.split(","):
        if not registry.is_present(model):
            doc["skipped"].append(f"{model}: not fetched (fasp-edge models fetch {model})")
            print(f"skipping {model}: not fetched; run fasp-edge models fetch {model}", file=sys.stderr)
            continue
        methods = args.methods.split(",")
        if "prune" in stages:
            for m in methods:
                key = f"{model}-{m}-r{round(100 * args.param_reduction)}-n{args.nsamples}x{args.seqlen}.prune"
                doc["prune"].append(cached(work, key, args.fresh, lambda: prune_row(args, work, texts, model, m)))
                print(f"pruned {model} {m}: {doc['prune'][-1]['seconds']} s, peak {doc['prune'][-1]['peak_rss_mb']} MB")
        if "quality" in stages:
            for m in ["dense", *methods]:
                tasks = f"-{args.tasks.replace(',', '+')}{args.task_limit}" if args.tasks else ""
                key = f"{model}-{m}-r{round(100 * args.param_reduction)}-w{args.windows}{tasks}.quality"
                doc["quality"].append(cached(work, key, args.fresh, lambda: quality_row(args, work, texts, model, m)))
                q = doc["quality"][-1]
                print(f"{model} {m}: English {q['english']['perplexity']:.3f}, code {q['code']['perplexity']:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "larger-models.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(RESULTS / "larger-models.md", markdown(doc))
    print(f"wrote {RESULTS / 'larger-models.md'}")


if __name__ == "__main__":
    main()
