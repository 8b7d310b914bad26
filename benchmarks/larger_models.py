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
  report's stage timings. Each prune saves its progress (``--resume-dir CHECKPOINT.progress``), so a run that was
  stopped continues where it stopped when the script runs again (the report's seconds then sum every run, and
  ``resumed_layers`` says how many layers an earlier run did; wall and peak RSS are the last run's);
- ``quality``: perplexity of dense, FASP and wanda-sp on the English and the code test text (``--windows`` x 512
  tokens from the start of each), through PyTorch;
- ``export``: dense and each ``--export-methods`` checkpoint as ``pte-8da4w`` (ExecuTorch, the default calibrated
  recipe) and ``onnx-4bit`` (ONNX Runtime ``MatMulNBits``, calibrated), both calibrated on calib-mixed, with the
  export's own parity check and quality pass (4 x 512 tokens of WikiText-2 test through the artifact against the
  PyTorch model it was made from), then the artifact's perplexity on the quality stage's English and code windows
  through its own runtime (``fasp-edge eval BUNDLE``); records wall time, peak RSS, sizes, partitions;
- ``bench``: ``fasp-edge bench`` over those bundles (``--profiles``, pte and onnx, ``--rounds`` fresh-process
  rounds), and llama.cpp on the Q4_0 requantization of the same dense weights (the fetched Q4_K_M GGUF, through
  benchmarks/runtime.py's side venv and quantizer), in the same run; checks the bars: the pruned 4-bit bundle
  decodes >= 1.15x the dense one of the same backend and precision in every profile, and fits a memory budget the
  dense one does not.

    .venv/bin/python benchmarks/larger_models.py --models qwen2.5-1.5b --methods fasp --stages prune
    .venv/bin/python benchmarks/larger_models.py --models qwen2.5-0.5b --stages export,bench
    .venv/bin/python benchmarks/larger_models.py              # every model, method and stage
    .venv/bin/python benchmarks/larger_models.py --cached-only  # rewrite the results from the rows already made

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
STAGES = ("prune", "quality", "export", "bench")
#: artifact name -> (export --formats, --quant)
ARTIFACTS = {"pte-8da4w": ("pte", "8da4w"), "onnx-4bit": ("onnx", "4bit")}
#: the bar of issue 16: a 20% parameter cut decodes at least this much faster than dense, same backend and precision
SPEEDUP_BAR = 1.15


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
                    "--seqlen", str(args.seqlen), "-o", str(out), "--overwrite", "--resume-dir", f"{out}.progress"]
    res = run_measured(cmd, work / f"{out.name}.prune.log")
    if res["rc"] != 0:
        raise SystemExit(f"prune failed ({res['command']}); see {work / (out.name + '.prune.log')}")
    report = json.loads((out / "fasp_report.json").read_text())
    keep = ("params_before", "params_after", "param_reduction", "seconds", "timings", "load_seconds", "damp_solves",
            "resumed_layers", "layer_seconds")
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


def variant_name(method: str, reduction: float) -> str:
    return "dense" if method == "dense" else f"{method}-r{round(100 * reduction)}"


def chosen_artifacts(args) -> list[str]:
    """``--artifacts`` as a list, checked against :data:`ARTIFACTS`."""
    names = [a for a in args.artifacts.split(",") if a]
    unknown = [a for a in names if a not in ARTIFACTS]
    if unknown or not names:
        raise SystemExit(f"--artifacts: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(ARTIFACTS)}")
    return names


def bundle_dir(work: Path, model: str, variant: str, artifact: str) -> Path:
    return work / "bundles" / f"{model}-{variant}-{artifact}"


def artifact_of(bundle: str) -> str:
    """The artifact name (:data:`ARTIFACTS`) a bundle folder's name ends with."""
    return next(a for a in ARTIFACTS if bundle.endswith(a))


def export_row(args, work: Path, texts: dict, model: str, method: str, artifact: str) -> dict:
    """Export one bundle (measured), then score the artifact on the English and code windows through its runtime."""
    fmt, quant = ARTIFACTS[artifact]
    source = model if method == "dense" else str(checkpoint(work, model, method, args.param_reduction))
    variant = variant_name(method, args.param_reduction)
    out = bundle_dir(work, model, variant, artifact)
    cmd = _cli() + ["export", source, "--formats", fmt, "--quant", quant, "--calib-text", texts["calib-mixed"]["path"],
                    "--quality-text", str(corpora.WIKI_TEST), "--max-context", str(args.max_context), "-o", str(out),
                    "--overwrite"]
    log_path = work / f"{out.name}.export.log"
    res = run_measured(cmd, log_path)
    if res["rc"] != 0:
        raise SystemExit(f"export failed ({res['command']}); see {log_path}")
    m = json.loads((out / "manifest.json").read_text())
    art = m["artifacts"][fmt]
    model_files = [f for f in m["files"] if f.startswith("model.")]
    row = {"model": model, "method": method, "variant": variant, "artifact": artifact, "bundle": str(out), **res,
           "export_seconds": art.get("export_seconds"), "model_bytes": sum(m["files"][f]["bytes"] for f in model_files),
           "bundle_bytes": sum(f["bytes"] for f in m["files"].values()), "parameters": m["model"]["parameters"],
           "parity": m["parity"][fmt], "decoder_parity": m["parity"]["decoder_vs_transformers"],
           "quality": m.get("quality", {}).get(fmt), "lowering": art.get("lowering"),
           "quantization": art.get("quantization"), "perplexity": {}}
    for name, path in (("english", str(corpora.WIKI_TEST)), ("code", texts["code-test"]["path"])):
        cmd = _cli() + ["--quiet", "eval", str(out), "--backend", fmt, "--text-file", path, "--seqlen", "512",
                        "--max-windows", str(args.windows), "--json"]
        log_path = work / f"{out.name}.eval-{name}.log"
        ev = run_measured(cmd, log_path)
        if ev["rc"] != 0:
            raise SystemExit(f"eval failed ({ev['command']}); see {log_path}")
        got = json.loads(log_path.read_text().strip().splitlines()[-1])
        row["perplexity"][name] = {"perplexity": got["perplexity"], "seconds": ev["seconds"],
                                   "peak_rss_mb": ev["peak_rss_mb"]}
    return row


def _llamacpp_q4_0(args, work: Path, model: str) -> dict:
    """llama.cpp on the Q4_0 requantization of the model's fetched GGUF (the weights our dense model dequantizes),
    through benchmarks/runtime.py's side venv, quantizer and decode loop; ``{"status": "not measured: ..."}`` if the
    peer cannot be built or run."""
    import runtime  # benchmarks/runtime.py: the llama.cpp peer of the SmolLM2 table

    peer: dict = {"llama_cpp_python": runtime.LLAMACPP_VERSION, "threads": runtime.LLAMACPP_THREADS,
                  "prompt": runtime.PROMPT, "new_tokens": runtime.NEW_TOKENS, "quants": {},
                  "weights": f"the fetched {registry.KNOWN[model].gguf_name} requantized by llama.cpp's own quantizer "
                             "(allow_requantize): the dense weights our bundles are made from"}
    try:
        py, peer["build"] = runtime._llamacpp_venv(Path(args.llamacpp_venv))
        q = runtime._llamacpp_quantize(py, registry.gguf_path(model), work / "llamacpp", "Q4_0",
                                       registry.KNOWN[model].sha256, stem=f"{model}-dense")
        peer["quants"]["Q4_0"] = {"status": "ok", **q}
        runtime._llamacpp_measure(py, peer, args.rounds)
        peer["status"] = peer["quants"]["Q4_0"]["status"]
    except Exception as e:  # a peer that cannot be set up is recorded, not fatal
        peer["status"] = f"not measured: {runtime._why(e)}"
    return peer


def bench_row(args, work: Path, model: str, methods: list[str], artifacts: list[str]) -> dict:
    """``fasp-edge bench`` over the model's bundles of ``artifacts``, then the llama.cpp Q4_0 peer, one after the
    other."""
    bundles = [bundle_dir(work, model, variant_name(m, args.param_reduction), a)
               for m in ["dense", *methods] for a in artifacts]
    missing = [str(b) for b in bundles if not (b / "manifest.json").is_file()]
    if missing:
        raise SystemExit(f"bench needs the export stage's bundles first; missing: {', '.join(missing)}")
    out = work / f"bench-{model}"
    cmd = _cli() + ["bench", *map(str, bundles), "--profiles", args.profiles,
                    "--backends", ",".join(ARTIFACTS[a][0] for a in artifacts),
                    "--rounds", str(args.rounds), "-o", str(out), "--overwrite"]
    res = run_measured(cmd, work / f"bench-{model}.log")
    if res["rc"] != 0:
        raise SystemExit(f"bench failed ({res['command']}); see {work / f'bench-{model}.log'}")
    bench = json.loads((out / "bench.json").read_text())
    return {"model": model, **res, "output": str(out), "settings": bench["settings"], "profiles": bench["profiles"],
            "rows": bench_rows(bench), "llamacpp": _llamacpp_q4_0(args, work, model)}


def bench_rows(bench: dict) -> list[dict]:
    """The figures of a ``fasp-edge bench`` result this table shows, a row per measured bundle and profile; each
    pruned row keeps the bench's own comparison with the dense bundle of its backend and precision (``vs_dense``:
    the decode speed-up as the median of the per-round ratios, and pooled)."""
    rows = []
    for r in bench["results"]:
        if r["status"] == "skipped":  # a bundle without the backend's artifact
            continue
        row = {"bundle": r["bundle"], "backend": r["backend"], "profile": r["profile"], "status": r["status"],
               "reason": r.get("reason"), "artifact_bytes": r.get("artifact_bytes")}
        if r["status"] == "ok":
            met = r["metrics"]
            row.update({"decode_tokens_per_s": round(met["decode_tokens_per_s"]["median"], 2),
                        "decode_values": [round(v, 2) for v in met["decode_tokens_per_s"]["values"]],
                        "round_decode_tokens_per_s": [round(v, 2) for v in r.get("round_decode_tokens_per_s", [])],
                        "ttft_ms": round(1000 * met["ttft_s"]["median"], 1),
                        "load_s": round(met["load_s"]["median"], 3), "memory": r["memory"],
                        "vs_dense": r.get("vs_dense")})
        rows.append(row)
    return rows


def bench_bars(bench: dict) -> dict:
    """The issue's bars from one bench row: each pruned bundle's decode over the dense bundle's of the same artifact
    and profile (the bench's own figure, the median of its per-round ratios, and the ratio of the pooled medians),
    and which memory budgets the pruned bundle fits that the dense one does not."""
    by = {(r["bundle"], r["profile"]): r for r in bench["rows"]}
    model, bars = bench["model"], {}
    for (bundle, profile), r in by.items():
        if r["status"] != "ok" or f"{model}-dense-" in bundle:
            continue
        artifact = artifact_of(bundle)
        d = by.get((f"{model}-dense-{artifact}", profile))
        if not d or d["status"] != "ok":
            continue
        vs = r.get("vs_dense") or {}
        if vs.get("reference") != d["bundle"]:
            continue
        speed, pooled = vs["decode_speedup"], vs["decode_speedup_pooled"]
        fits = r["memory"]["verdict"] == "within budget" and d["memory"]["verdict"] != "within budget"
        bars[f"{bundle} {profile}"] = {"decode_vs_dense": round(speed, 3), "decode_vs_dense_pooled": round(pooled, 3),
                                       "bar": SPEEDUP_BAR, "meets": speed >= SPEEDUP_BAR,
                                       "meets_pooled": pooled >= SPEEDUP_BAR, "model_mb": r["memory"]["model_rss_mb"],
                                       "dense_model_mb": d["memory"]["model_rss_mb"],
                                       "budget_mb": r["memory"]["budget_mb"], "fits_where_dense_does_not": fits}
    return bars


def cached(work: Path, key: str, fresh: bool, make, only_cached: bool = False) -> dict | None:
    path = work / f"{key}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    if only_cached:
        print(f"not run yet: {key}", file=sys.stderr)
        return None
    row = make()
    atomic_write_text(path, json.dumps(row, indent=1) + "\n")
    return row


#: what names a row of each stage: a row of the previous results with the same identity is replaced, not kept
ROW_IDENTITY = {"prune": ("model", "method"), "quality": ("model", "method"), "export": ("model", "variant", "artifact"),
                "bench": ("model",)}
#: the options a stage's rows depend on (besides the cut and calibration): rows are carried only where they match
#: (a quality row records its own zero-shot tasks, so rows with and without them sit in one table; a bench row
#: compares one model's bundles within itself and records its own profiles and rounds, which its table shows)
STAGE_SETTINGS = {"prune": (), "quality": ("windows",), "export": ("windows", "max_context"),
                  "bench": ("max_context",)}
#: the options of the results written before they were recorded in the file (the 0.5B rows of 2026-12-07)
UNRECORDED_SETTINGS = {"windows": 8, "tasks": "piqa", "task_limit": 100, "max_context": 512,
                       "profiles": "hub,phone-mid", "rounds": 2}


def run_settings(args) -> dict:
    return {k: getattr(args, k) for k in UNRECORDED_SETTINGS}


def carry_previous(doc: dict, previous: dict | None) -> None:
    """Keep the rows of the previous results file that this run neither made nor found in --work (an earlier
    session's cache that is gone, or a model this run did not touch), so the results accumulate instead of losing
    them. Only rows made with the same cut and calibration, and the same options for their stage, are kept; each
    one is listed in ``doc["carried"]`` with the date of the results it first came from, and the markdown says so."""
    if not previous or any(previous.get(k) != doc[k] for k in ("param_reduction", "nsamples", "seqlen")):
        return
    before = previous.get("run_settings", UNRECORDED_SETTINGS)
    order = {m: i for i, m in enumerate(MODELS)}
    for stage, fields in ROW_IDENTITY.items():
        if any(before.get(k) != doc["run_settings"][k] for k in STAGE_SETTINGS[stage]):
            continue
        have = {tuple(r.get(f) for f in fields) for r in doc[stage]}
        for r in previous.get(stage, []):
            ident = tuple(r.get(f) for f in fields)
            if ident in have:
                continue
            made = r.setdefault("results_date", previous.get("date", "?"))  # kept through later carries
            doc[stage].append(r)
            doc["carried"].append(f"{stage}: {' '.join(map(str, ident))} (from the results of {made})")
            if stage == "bench":
                doc["bars"].update({k: v for k, v in previous.get("bars", {}).items()
                                    if k.startswith(f"{r['model']}: ")})
        doc[stage].sort(key=lambda r: order.get(r.get("model"), len(order)))


def _spread(values: list[float] | None) -> str:
    if not values:
        return "–"
    v = sorted(values)
    return f"{v[0]:.0f} / {v[len(v) // 2]:.0f} / {v[-1]:.0f}"


def markdown(doc: dict) -> str:
    lines = [f"# Larger models (dequantized Q4_K_M): a {round(100 * doc['param_reduction'])}% parameter cut",
             "", f"`{doc['command']}` ({doc['date']}, {doc['machine']})", "",
             f"Calibration: {doc['nsamples']} x {doc['seqlen']} tokens of calib-mixed (WikiText-2 validation + "
             "stdlib modules a-m); evaluation: WikiText-2 test and stdlib modules n-z (benchmarks/corpora.py).", ""]
    if doc.get("carried"):
        lines += ["Rows kept from an earlier run's results (not remade by this command; same cut and calibration):", "",
                  *[f"- {c}" for c in doc["carried"]], ""]
    if doc["prune"]:
        lines += ["## Pruning cost", "", "| model | method | parameters | removed | wall s | peak RSS MB | "
                  "load s | allocation s | forward s | statistics s | solve s | a layer, s (min / median / max) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in doc["prune"]:
            rep, t = r["report"], r["report"].get("timings", {})
            lines.append(f"| {r['model']} | {r['method']} | {rep.get('params_before', 0) / 1e6:.0f}M -> "
                         f"{rep.get('params_after', 0) / 1e6:.0f}M | {100 * rep.get('param_reduction', 0):.1f}% | "
                         f"{r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | {rep.get('load_seconds', 0):.0f} | "
                         f"{t.get('allocation', 0):.0f} | {t.get('forward', 0):.0f} | {t.get('statistics', 0):.0f} | "
                         f"{t.get('solve', 0):.0f} | {_spread(rep.get('layer_seconds'))} |")
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
    if doc["export"]:
        lines += ["", "## Artifacts (calibrated on calib-mixed; quality through each artifact's own runtime)", "",
                  "parity = max |Δ logits| against transformers over a 64-token prefill + 32 greedy decode steps; vs "
                  "PyTorch = the export's quality pass, 4 x 512 tokens of WikiText-2 test through the artifact, "
                  "perplexity over the PyTorch model's it was made from, and top-1 agreement; English and code = "
                  "the artifact's perplexity on the quality stage's windows (`fasp-edge eval BUNDLE`).", "",
                  "| model | variant | artifact | model file(s) MB | export wall s | peak RSS MB | partitions | parity "
                  "max abs diff | vs PyTorch | top-1 agreement | English | code |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in doc["export"]:
            q, low = r["quality"] or {}, r["lowering"] or {}
            lines.append(f"| {r['model']} | {r['variant']} | {r['artifact']} | {r['model_bytes'] / 1e6:.1f} | "
                         f"{r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | {low.get('delegate_partitions', '–')} | "
                         f"{r['parity']['max_abs_diff']:.2e} | {q.get('perplexity_ratio', float('nan')):.3f}x | "
                         f"{q.get('top1_agreement', float('nan')):.3f} | "
                         f"{r['perplexity']['english']['perplexity']:.3f} | {r['perplexity']['code']['perplexity']:.3f} |")
    for b in doc["bench"]:
        s = b["settings"]
        lines += ["", f"## Runtime: {b['model']} (`fasp-edge bench`, {s['reps']} generations x {s['rounds']} "
                  "fresh-process rounds, medians)", "",
                  "| bundle | backend | profile | decode tok/s | vs dense | TTFT ms | load s | model MB | size MB | "
                  "budget |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['bundle']} | {r['backend']} | {r['profile']} | {r['status']}: {r['reason']} "
                             "| | | | | | |")
                continue
            vs = r.get("vs_dense") or {}
            ratio = f"{vs['decode_speedup']:.2f}x" if "decode_speedup" in vs else ""
            mem = r["memory"]
            verdict = "fits" if mem["verdict"] == "within budget" else "**over**"
            lines.append(f"| {r['bundle']} | {r['backend']} | {r['profile']} | {r['decode_tokens_per_s']:.1f} | "
                         f"{ratio} | {r['ttft_ms']:.0f} | {r['load_s']:.2f} | {mem['model_rss_mb']:.0f} | "
                         f"{r['artifact_bytes'] / 1e6:.1f} | {verdict} ({mem['budget_mb']}) |")
        peer = b["llamacpp"]
        q = peer.get("quants", {}).get("Q4_0", {})
        if q.get("status") == "ok":
            lines.append(f"| llama.cpp Q4_0 (same dense weights) | llama.cpp {peer['llama_cpp_python']} | "
                         f"{peer['threads']} threads | {q['decode_tokens_per_s']['median']:.1f} | | {q['ttft_ms']:.0f} "
                         f"| {q['load_s']['median']:.2f} | | {q['size_mb']:.1f} | |")
        else:
            lines.append(f"\nllama.cpp Q4_0: {peer['status']}")
        lines.append("\nvs dense = the bench's decode speed-up over the dense bundle of the same backend and "
                     "precision in the same run (the median of the per-round ratios); model MB = peak RSS of the "
                     "measuring process less its RSS before loading; budget = the profile's memory budget. TTFT over the profile's prompt; llama.cpp: the runtime.py prompt "
                     f"({peer['prompt']!r}), {peer['new_tokens']} greedy tokens.")
    if doc["bars"]:
        lines += ["", f"## Bars (pruned decode >= {SPEEDUP_BAR}x dense, same backend and precision; a budget the "
                  "pruned bundle fits and the dense one does not)", ""]
        for k, v in doc["bars"].items():
            lines.append(f"- {k}: decode {v['decode_vs_dense']:.3f}x dense, pooled {v['decode_vs_dense_pooled']:.3f}x ("
                         f"{'meets' if v['meets'] else '**misses**'} {v['bar']}x; pooled "
                         f"{'meets' if v['meets_pooled'] else '**misses**'}); model {v['model_mb']:.0f} MB vs dense {v['dense_model_mb']:.0f} MB, budget "
                         f"{v['budget_mb']} MB: " + ("fits where dense does not" if v["fits_where_dense_does_not"]
                                                    else "no budget difference here"))
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
    ap.add_argument("--export-methods", default="fasp", help="pruned checkpoints exported beside dense")
    ap.add_argument("--artifacts", default=",".join(ARTIFACTS),
                    help="the export and bench stages' artifacts (default: all)")
    ap.add_argument("--max-context", type=int, default=512, help="the bundles' KV-cache length")
    ap.add_argument("--profiles", default="hub,phone-mid", help="bench device profiles")
    ap.add_argument("--rounds", type=int, default=2, help="bench fresh-process rounds, pooled")
    ap.add_argument("--llamacpp-venv", default=str(REPO / "benchmarks" / "peers" / "llamacpp-venv"))
    ap.add_argument("--work", default=str(REPO / "out" / "larger"))
    ap.add_argument("--fresh", action="store_true", help="redo rows already in --work")
    ap.add_argument("--cached-only", action="store_true",
                    help="make nothing: write the results from the rows already in --work (the others: not run)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    texts = corpora.build(work / "corpora")
    stages = args.stages.split(",")
    artifacts = chosen_artifacts(args)  # checked before any stage runs
    doc = {"command": "benchmarks/larger_models.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "param_reduction": args.param_reduction,
           "nsamples": args.nsamples, "seqlen": args.seqlen, "texts": texts, "skipped": [], "prune": [], "quality": [],
           "export": [], "bench": [], "bars": {}, "carried": [], "run_settings": run_settings(args)}
    for model in args.models.split(","):
        if not registry.is_present(model):
            doc["skipped"].append(f"{model}: not fetched (fasp-edge models fetch {model})")
            print(f"skipping {model}: not fetched; run fasp-edge models fetch {model}", file=sys.stderr)
            continue
        methods = args.methods.split(",")
        if "prune" in stages:
            for m in methods:
                key = f"{model}-{m}-r{round(100 * args.param_reduction)}-n{args.nsamples}x{args.seqlen}.prune"
                row = cached(work, key, args.fresh, lambda: prune_row(args, work, texts, model, m), args.cached_only)
                if row:
                    doc["prune"].append(row)
                    print(f"pruned {model} {m}: {row['seconds']} s, peak {row['peak_rss_mb']} MB")
        if "quality" in stages:
            for m in ["dense", *methods]:
                tasks = f"-{args.tasks.replace(',', '+')}{args.task_limit}" if args.tasks else ""
                key = f"{model}-{m}-r{round(100 * args.param_reduction)}-w{args.windows}{tasks}.quality"
                q = cached(work, key, args.fresh, lambda: quality_row(args, work, texts, model, m), args.cached_only)
                if q:
                    doc["quality"].append(q)
                    print(f"{model} {m}: English {q['english']['perplexity']:.3f}, code {q['code']['perplexity']:.3f}")
        exported = [m for m in args.export_methods.split(",") if m]
        if "export" in stages:
            for m in ["dense", *exported]:
                for a in artifacts:
                    key = f"{bundle_dir(work, model, variant_name(m, args.param_reduction), a).name}-c{args.max_context}.export"
                    row = cached(work, key, args.fresh, lambda: export_row(args, work, texts, model, m, a),
                                 args.cached_only)
                    if row:
                        doc["export"].append(row)
                        print(f"exported {model} {row['variant']} {a}: {row['model_bytes'] / 1e6:.1f} MB, "
                              f"English {row['perplexity']['english']['perplexity']:.3f}, "
                              f"code {row['perplexity']['code']['perplexity']:.3f}")
        if "bench" in stages:
            only = "" if set(artifacts) == set(ARTIFACTS) else "-" + "+".join(artifacts)
            key = (f"bench-{model}-{'+'.join(exported)}-r{round(100 * args.param_reduction)}-"
                   f"{args.profiles.replace(',', '+')}{only}")
            row = cached(work, key, args.fresh, lambda: bench_row(args, work, model, exported, artifacts),
                         args.cached_only)
            if row:
                doc["bench"].append(row)
                doc["bars"].update({f"{model}: {k}": v for k, v in bench_bars(row).items()})
    previous = RESULTS / "larger-models.json"
    carry_previous(doc, json.loads(previous.read_text()) if previous.is_file() else None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "larger-models.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(RESULTS / "larger-models.md", markdown(doc))
    print(f"wrote {RESULTS / 'larger-models.md'}")


if __name__ == "__main__":
    main()
