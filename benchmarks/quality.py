"""Quality and pruning-cost benchmark on SmolLM2-135M-Instruct (dequantized Q4_1).

Two grids, each configuration in a fresh process so that its peak RSS is its own:

- ``--grid sparsity`` (default): dense vs magnitude / wanda-sp / fasp at several ``--sparsity`` values; calibration
  on WikiText-2 VALIDATION (128 x 512 tokens, seed 0), evaluation on WikiText-2 TEST (first N windows of 512 tokens),
  each method with the library's defaults (the rows record fasp's refit). Rows land in ``--work``
  (out/quality-sparsity) as they finish and are reused, as in the budget grid below. Writes
  benchmarks/results/quality.{json,md}.
- ``--grid budget``: at each fraction R of ALL parameters removed (``--param-reduction``), the new FASP
  (:data:`BUDGET_VARIANTS`: the budget spread over layers, the refit damped toward the kept weights with λ chosen on
  held-out calibration windows, OBS channel selection) against uniform FASP as it was (the same fraction of every
  pair, the refit before: ridge λ = 0.01, column score) and wanda-sp (the new allocation, no refit), calibrated on WikiText-2 validation and data-free (text
  sampled from the model itself, seed 0), evaluated on WikiText-2 test and on the Brown corpus (a second domain).
  Each row lands in ``--work`` as it finishes and is reused on the next run whatever the code (``--fresh`` redoes
  them, as it should after a change to pruning; ``--measured`` tabulates the rows already there and runs none).
  Writes benchmarks/results/quality-budget.{json,md}.

    .venv/bin/python benchmarks/quality.py                 # sparsity grid, about 40 minutes on 2 cores
    .venv/bin/python benchmarks/quality.py --methods fasp --sparsities 0.2 --windows 8   # quick look
    .venv/bin/python benchmarks/quality.py --grid budget   # 18 prunes: about 2.5 hours on 2 cores
    .venv/bin/python benchmarks/quality.py --grid budget --reductions 0.16 --calibrations wikitext2

Nothing is chosen on the test texts: they only measure.
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

from fasp_edge.fsutil import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASP_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIB = DATA / "wikitext2" / "wiki.valid.tokens"
TEST = DATA / "wikitext2" / "wiki.test.joined.txt"
BROWN = DATA / "brown" / "brown.txt"
EVAL_TEXTS = {"wikitext2_test": TEST, "brown": BROWN}
#: the budget grid's methods: how each spends a budget of --param-reduction R (prune() keyword arguments)
_NEW_REFIT = {"damp": "auto", "refit_prior": "original", "selection": "obs"}
BUDGET_VARIANTS = {
    "fasp": ("new FASP: error-curve allocation, refit damped toward the kept weights (λ on held-out windows), "
             "OBS selection", {"method": "fasp", "allocation": "error", **_NEW_REFIT}),
    "fasp-standardized": ("new FASP with FLAP's standardized allocation instead",
                          {"method": "fasp", "allocation": "standardized", **_NEW_REFIT}),
    "fasp-uniform": ("FASP as it was: the same fraction of every pair, ridge refit λ = 0.01, column score",
                     {"method": "fasp", "allocation": "uniform", "damp": 0.01, "refit_prior": "zero",
                      "selection": "score"}),
    "wanda-sp": ("wanda-sp: the error-curve allocation, no refit", {"method": "wanda-sp", "allocation": "error"}),
    "wanda-sp-standardized": ("wanda-sp: the standardized allocation, no refit",
                              {"method": "wanda-sp", "allocation": "standardized"}),
}
CALIBRATIONS = ("wikitext2", "self")


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
        if cfg["method"] == "fasp":  # the library's default refit, recorded: the defaults may move, the rows not
            out["refit"] = {k: rep[k] for k in ("damp", "refit_prior", "selection")}
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


def _calibration(cfg: dict, model, tok):
    """The calibration windows of ``cfg``: WikiText-2 validation, or text sampled from the model (cached in the
    work folder: the same seed gives the same windows, so every data-free row prunes from the same text)."""
    import torch

    from fasp_edge.pipeline.calibration import calibration_windows, self_generated_windows

    if cfg["calibration"] == "wikitext2":
        return calibration_windows(tok, file=CALIB, nsamples=cfg["nsamples"], seqlen=cfg["seqlen"], seed=0).windows
    cache = Path(cfg["work"]) / f"self-calibration-{cfg['nsamples']}x{cfg['seqlen']}-seed0.pt"
    if cache.exists():
        return torch.load(cache)
    t0 = time.perf_counter()
    windows = self_generated_windows(model, tok, nsamples=cfg["nsamples"], seqlen=cfg["seqlen"], seed=0,
                                     progress=False).windows
    tmp = cache.with_suffix(".tmp")
    torch.save(windows, tmp)
    tmp.rename(cache)
    print(f"  sampled {cfg['nsamples']} x {cfg['seqlen']} calibration tokens in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return windows


def budget_child(cfg: dict) -> dict:
    """One row of the budget grid, in this process: load, calibrate, prune to R of all parameters, evaluate."""
    import torch

    from fasp_edge import load_model, perplexity, prune
    from fasp_edge.pipeline.calibration import read_text_file

    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    out = dict(cfg)
    if cfg["variant"] != "dense":
        calib = _calibration(cfg, model, tok)
        kwargs = BUDGET_VARIANTS[cfg["variant"]][1]
        t0 = time.perf_counter()
        r = prune(model, tok, param_reduction=cfg["reduction"], calibration=calib, progress=False, **kwargs)
        rep = r.report()
        out.update({"prune_seconds": round(time.perf_counter() - t0, 1), "settings": kwargs,
                    **{k: rep[k] for k in ("params_before", "params_after", "param_reduction", "ffn_dims",
                                           "v_head_dims", "timings")}})
    for name, path in EVAL_TEXTS.items():
        res = perplexity(model, tok, read_text_file(path), seqlen=512, max_windows=cfg["windows"], progress=False)
        out[name] = res["perplexity"]
    out.update({"peak_rss_mb": round(_rss_mb(), 1), "threads": torch.get_num_threads()})
    return out


def budget_markdown(rows: list[dict], windows: int) -> str:
    dense = next(r for r in rows if r["variant"] == "dense")
    lines = [
        f"SmolLM2-135M-Instruct (dequantized Q4_1) pruned to a fraction of ALL its parameters (`--param-reduction`); "
        f"perplexity over the dense model's on the first {windows} windows of 512 tokens of WikiText-2 test and of "
        f"the Brown corpus (dense: {dense['wikitext2_test']:.2f} and {dense['brown']:.2f}). Calibration "
        f"{dense['nsamples']} x {dense['seqlen']} tokens, seed 0: WikiText-2 validation, or text sampled from the "
        "model itself (data-free).",
        "",
        "| R | calibration | method | removed | FFN widths | value dims | WikiText-2 test | Brown | prune s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["variant"] == "dense":
            continue
        lines.append(
            f"| {r['reduction']:.2f} | {r['calibration']} | {r['variant']} | {100 * r['param_reduction']:.2f}% | "
            f"{min(r['ffn_dims'])}-{max(r['ffn_dims'])} | {min(r['v_head_dims'])}-{max(r['v_head_dims'])} | "
            f"{r['wikitext2_test'] / dense['wikitext2_test']:.3f} | {r['brown'] / dense['brown']:.3f} | "
            f"{r['prune_seconds']:.0f} |")
    shown = {r["variant"] for r in rows}
    lines += ["", "Methods:"] + [f"- `{k}`: {v[0]}; `{v[1]}`" for k, v in BUDGET_VARIANTS.items() if k in shown]
    return "\n".join(lines) + "\n"


def run_rows(configs: list[dict], key, work: Path, args, summary) -> list[dict]:
    """Each configuration in its own process; a finished row lands in ``work`` at once and is reused on the next run
    (``--fresh`` redoes it, ``--measured`` runs none), so a grid that is stopped resumes where it was."""
    rows = []
    for i, cfg in enumerate(configs, 1):
        done = work / f"{key(cfg)}.json"
        if done.exists() and not args.fresh:
            rows.append(json.loads(done.read_text()))
            print(f"[{i}/{len(configs)}] {key(cfg)}: reused from {done}", file=sys.stderr, flush=True)
            continue
        if args.measured:
            print(f"[{i}/{len(configs)}] {key(cfg)}: not measured, left out (--measured)", file=sys.stderr, flush=True)
            continue
        print(f"[{i}/{len(configs)}] {key(cfg)} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"quality.py: {key(cfg)} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        atomic_write_text(done, json.dumps(row, indent=2) + "\n")
        rows.append(row)
        print(f"  {summary(row)}", file=sys.stderr, flush=True)
    return rows


def run_budget(args) -> None:
    work = Path(args.work or REPO / "out" / "quality-budget")
    work.mkdir(parents=True, exist_ok=True)
    common = {"grid": "budget", "windows": args.windows, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "work": str(work)}
    configs = [{"variant": "dense", "reduction": 0.0, "calibration": "none", **common}]
    for r in [float(x) for x in args.reductions.split(",")]:
        for c in args.calibrations.split(","):
            for v in args.variants.split(","):
                configs.append({"variant": v, "reduction": r, "calibration": c, **common})
    rows = run_rows(configs, lambda c: f"{c['variant']}-r{c['reduction']:.2f}-{c['calibration']}-w{c['windows']}",
                    work, args, lambda r: f"WikiText-2 test {r['wikitext2_test']:.3f}, Brown {r['brown']:.3f}, "
                                          f"prune {r.get('prune_seconds', 0):.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]), "host": host(),
              "variants": {k: {"description": v[0], "settings": v[1]} for k, v in BUDGET_VARIANTS.items()},
              "runs": rows}
    atomic_write_text(out / "quality-budget.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "quality-budget.md", budget_markdown(rows, args.windows))
    print(budget_markdown(rows, args.windows))


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
        "calibration 128 x 512 tokens of WikiText-2 validation, seed 0."
        + "".join(sorted({f" fasp's refit (the library's default): damp {r['refit']['damp']}, refit_prior "
                          f"{r['refit']['refit_prior']}, selection {r['refit']['selection']}."
                          for r in rows if "refit" in r})),
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
    ap.add_argument("--grid", choices=("sparsity", "budget"), default="sparsity")
    ap.add_argument("--methods", default="magnitude,wanda-sp,fasp")
    ap.add_argument("--sparsities", default="0.1,0.2,0.3")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--reductions", default="0.08,0.16,0.24", help="budget grid: fractions of all parameters")
    ap.add_argument("--calibrations", default=",".join(CALIBRATIONS), help="budget grid: wikitext2 and/or self")
    ap.add_argument("--variants", default=",".join(BUDGET_VARIANTS), help="budget grid: methods")
    ap.add_argument("--work", default=None, help="finished rows, reused (default: out/quality-sparsity or "
                    "out/quality-budget)")
    ap.add_argument("--fresh", action="store_true", help="redo rows already in --work (after a change to pruning)")
    ap.add_argument("--measured", action="store_true", help="tabulate the rows already in --work, run none")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cfg = json.loads(args.child)
        print(json.dumps(budget_child(cfg) if cfg.get("grid") == "budget" else child(cfg)))
        return
    for f in (CALIB, TEST, BROWN):
        if not f.exists():
            sys.exit(f"quality.py: {f} not found (set FASP_EDGE_SHARED_DATA)")
    if args.grid == "budget":
        bad = [v for v in args.variants.split(",") if v not in BUDGET_VARIANTS] + \
            [c for c in args.calibrations.split(",") if c not in CALIBRATIONS]
        if bad:
            sys.exit(f"quality.py: unknown {', '.join(bad)}; variants: {', '.join(BUDGET_VARIANTS)}; calibrations: "
                     f"{', '.join(CALIBRATIONS)}")
        run_budget(args)
        return
    common = {"windows": args.windows, "nsamples": args.nsamples, "seqlen": args.seqlen}
    configs = [{"method": "dense", "sparsity": 0.0, **common}]
    for s in [float(x) for x in args.sparsities.split(",")]:
        for m in args.methods.split(","):
            configs.append({"method": m, "sparsity": s, **common})
    work = Path(args.work or REPO / "out" / "quality-sparsity")
    work.mkdir(parents=True, exist_ok=True)
    rows = run_rows(configs,
                    lambda c: f"{c['method']}-s{c['sparsity']:.2f}-{c['nsamples']}x{c['seqlen']}-w{c['windows']}",
                    work, args, lambda r: f"ppl {r['ppl']:.3f}  prune {r.get('prune_seconds', 0):.1f} s  "
                                          f"peak RSS {r['peak_rss_mb']:.0f} MB")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]), "host": host(), "runs": rows}
    atomic_write_text(out / "quality.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "quality.md", markdown(rows, args.windows))
    print(markdown(rows, args.windows))


if __name__ == "__main__":
    main()
