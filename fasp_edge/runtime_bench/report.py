"""Writing a bench result: ``bench.json`` (checked against ``bench.schema.json``), ``bench.md`` and PNG plots.

The Markdown leads with the ratios against the dense bundle, because on a shared or throttling machine
ratios measured in one run are what carries over; absolute figures follow, then what of each profile
could not be applied on this host, what was skipped and why, and the host.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..fsutil import atomic_output_dir

PLOTS = {"decode_tokens_per_s.png": "decode tokens/s", "peak_memory_mb.png": "peak memory of the model (MB)"}


def schema() -> dict:
    return json.loads((resources.files(__package__) / "bench.schema.json").read_text())


def validate(doc: dict) -> None:
    """Raise ``jsonschema.ValidationError`` if ``doc`` does not follow the documented schema."""
    import jsonschema

    jsonschema.validate(doc, schema())


def _versus_table(ok: list[dict], key: str, title: str, note: str | None = None) -> list[str]:
    """A Markdown table of the rows' ``key`` comparison (``vs_dense``, ``vs_dense_fp32``), or nothing."""
    rows = [r for r in ok if r.get(key)]
    if not rows:
        return []
    lines = [title, "", *([note, ""] if note else []),
             "| profile | backend | bundle | vs | decode speed-up | TTFT speed-up | memory ratio | size ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r[key]
        lines.append(f"| {r['profile']} | {r['backend']} | {r['bundle']} | {v['reference']} | "
                     f"{_fmt(v['decode_speedup'])}x | {_fmt(v['ttft_speedup'])}x | {_fmt(v['memory_ratio'])} | "
                     f"{_fmt(v['size_ratio'])} |")
    return lines + [""]


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _spread(s: dict, scale: float = 1.0, digits: int = 1) -> str:
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f}]"


def markdown(doc: dict) -> str:
    host, settings = doc["host"], doc["settings"]
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    lines = ["# fasp-edge bench", "",
             f"{host['cpu_model']} ({host['usable_cpus']} usable of {host['logical_cpus']} CPUs, {host['arch']}, "
             f"{host['os']}); {settings['reps']} counted runs after {settings['warmup']} warm-up per row and process, "
             f"each row in a fresh process" + (f", {settings['rounds']} rounds over all rows (rows compared with each "
                                               "other back to back, every other round in reverse), metrics pooled, "
                                               "a decode speed-up the median of the per-round ratios"
                                               if settings.get("rounds", 1) > 1 else "")
             + f"; {doc['duration_s']:.0f} s in all.", ""]
    lines += _versus_table(ok, "vs_dense", "## Against the dense bundle (same backend, same precision, same profile, "
                           "same run)", "Speed-ups > 1 and ratios < 1 are better.")
    lines += _versus_table(ok, "vs_dense_fp32", "## Quantized against the dense fp32 bundle (across precisions: "
                           "quantization's gain, plus pruning's where pruned)")
    vs_opt = [r for r in ok if r.get("vs_optimum")]
    if vs_opt:
        lines += ["## Our ONNX export against optimum-onnx's (same profile, same run)", "",
                  "| profile | bundle | vs | decode speed-up | TTFT speed-up | memory ratio | size ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in vs_opt:
            v = r["vs_optimum"]
            lines.append(f"| {r['profile']} | {r['bundle']} | {v['reference']} | {_fmt(v['decode_speedup'])}x | "
                         f"{_fmt(v['ttft_speedup'])}x | {_fmt(v['memory_ratio'])} | {_fmt(v['size_ratio'])} |")
        lines.append("")
    if ok:
        lines += ["## Measurements", "",
                  "Median [min–max]. Load: the cold load of each fresh process. Model memory: peak RSS minus the RSS "
                  "before loading (the interpreter and libraries), judged against the profile's budget.", "",
                  "| profile | backend | bundle | load s | TTFT ms | prefill tok/s | decode tok/s | peak RSS MB | "
                  "model MB | size MB | budget |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ok:
            m, mem = r["metrics"], r["memory"]
            verdict = "fits" if mem["verdict"] == "within budget" else "**over**"
            lines.append(f"| {r['profile']} | {r['backend']} | {r['bundle']} | {m['load_s']['median']:.2f} | "
                         f"{_spread(m['ttft_s'], 1000)} | {_spread(m['prefill_tokens_per_s'])} | "
                         f"{_spread(m['decode_tokens_per_s'])} | {mem['peak_rss_mb']:.0f} | {mem['model_rss_mb']:.0f} | "
                         f"{r['artifact_bytes'] / 1e6:.1f} | {verdict} ({mem['budget_mb']}) |")
        lines.append("")
    notes = list(dict.fromkeys(f"{r['profile']}: {n}" for r in ok for n in r.get("not_applied", [])))
    if notes:
        lines += ["## Not applied on this host", ""] + [f"- {n}" for n in notes] + [""]
    other = [r for r in doc["results"] if r["status"] != "ok"]
    if other:
        lines += ["## Skipped or failed", ""]
        lines += [f"- {r['profile']} / {r['backend']} / {r['bundle']}: {r['status']}: {r['reason']}" for r in other]
        lines.append("")
    lines += ["## Profiles", "", "| profile | threads | memory budget MB | prompt | generate | context | device |",
              "|---|---|---|---|---|---|---|"]
    for p in doc["profiles"].values():
        lines.append(f"| {p['name']} | {p['threads']} | {p['memory_budget_mb']} | {p['prompt_tokens']} | "
                     f"{p['generate_tokens']} | {p['context_length']} | {p['description']} |")
    lines += ["", "## Bundles", "", "| bundle | pruning | quantization | parameters | files MB |", "|---|---|---|---|---|"]
    for b in doc["bundles"]:
        pr = b["pruning"]
        pruning = ((f"{pr['method']} {pr['sparsity']}" if pr.get("param_reduction") is None else
                    f"{pr['method']}, {100 * pr['param_reduction']:g}% of parameters") if pr else
                   ("dense, " + b["external"] if b["external"] else "dense"))
        lines.append(f"| {b['label']} | {pruning} | {b['quantization']} | {b['parameters'] or '–'} | "
                     f"{b['files_bytes'] / 1e6:.1f} |")
    lines += ["", "## Host", "", f"- CPU: {host['cpu_model']}, {host['logical_cpus']} logical CPUs, "
              f"{host['usable_cpus']} usable; memory {_fmt(host['memory_total_mb'], 0)} MB",
              f"- OS: {host['os']} ({host['arch']})",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in host["versions"].items()), ""]
    return "\n".join(lines)


def plot(doc: dict, folder: Path) -> list[str]:
    """Grouped bars per profile: decode tokens/s and model memory (with the budget) for every backend and bundle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if r["status"] == "ok"]
    profiles = [p for p in doc["settings"]["profiles"] if any(r["profile"] == p for r in ok)]
    bundles = [b["label"] for b in doc["bundles"]]
    cmap = plt.get_cmap("tab10" if len(bundles) <= 10 else "tab20")
    colours = {b: cmap(i % cmap.N) for i, b in enumerate(bundles)}
    written = []
    for fname, ylabel in PLOTS.items():
        fig, axes = plt.subplots(1, max(len(profiles), 1), figsize=(5.5 * max(len(profiles), 1), 4.2), squeeze=False)
        seen: set[str] = set()
        for ax, prof in zip(axes[0], profiles or ["(nothing measured)"]):
            rows = [r for r in ok if r["profile"] == prof]
            backends = [b for b in doc["settings"]["backends"] if any(r["backend"] == b for r in rows)]
            groups = {be: [b for b in bundles if any(r["bundle"] == b and r["backend"] == be for r in rows)]
                      for be in backends}
            width = 0.8 / max((len(g) for g in groups.values()), default=1)
            for i, be in enumerate(backends):  # bars packed per backend; one colour per bundle across groups
                for j, label in enumerate(groups[be]):
                    r = next(x for x in rows if x["bundle"] == label and x["backend"] == be)
                    y = (r["metrics"]["decode_tokens_per_s"]["median"] if fname.startswith("decode")
                         else r["memory"]["model_rss_mb"])
                    ax.bar(i + (j - (len(groups[be]) - 1) / 2) * width, y, width, color=colours[label],
                           label=label if label not in seen else None)
                    seen.add(label)
            if fname.startswith("peak_memory") and prof in doc["profiles"]:
                ax.axhline(doc["profiles"][prof]["memory_budget_mb"], color="black", linestyle="--", linewidth=1,
                           label="budget")
            ax.set_xticks(range(len(backends)), backends)
            ax.set_title(prof)
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        handles, labels = [], []
        for ax in axes[0]:
            for h, lbl in zip(*ax.get_legend_handles_labels()):
                if lbl not in labels:
                    handles.append(h)
                    labels.append(lbl)
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(labels) - 1) // 4 if handles else 0), 1, 1))
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def write_report(doc: dict, output: str | Path, overwrite: bool = False) -> Path:
    """Validate ``doc`` and write bench.json, bench.md and the plots into ``output`` (atomically)."""
    validate(doc)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        (tmp / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / "bench.md").write_text(markdown(doc))
        plot(doc, tmp)
    return Path(output)
