"""Where a 4-bit decode step's time goes: the fixed cost of a token against the cost of the weights it reads.

    .venv/bin/python benchmarks/decode_profile.py      # ~5 min on 2 cores (+2 min the first time: the control export)

A pruned model saves only the part of a decode step that scales with its weights. This benchmark splits a step of
the dense SmolLM2 pte-8da4w bundle in two with a control: a bundle of SmolLM2's graph (30 layers, 9 query heads and
3 KV heads of 64, vocab 49152, context 512, the same 8da4w recipe, the same delegate partitions and operators)
whose hidden and MLP widths are 64, so that its weights are 5% of SmolLM2's and its decode step is the fixed
cost: the attention and cache custom ops, the small XNNPACK operators between the Linears, the runtime's calls
and the Python loop. Dense minus control is the weight-dependent time of the dense step; FASP-0.3 (``--align 32``)
minus the same control bounds FASP's from above (its padded value heads add operators, never remove any).

All bundles are loaded in one process pinned to the first 2 CPUs, 2 XNNPACK threads, torch's OpenMP pool at 1
thread (set before torch loads, as `fasp-edge bench` does), and timed in interleaved rounds (every other round
reversed): a 64-token prefill, then 64 decode steps of one fixed token at positions 64-127 (the `hub` profile's),
ms per step. A ratio is the median of the per-round ratios. The weight bytes one step reads are computed from the
manifests (each Linear's shape and precision: 4-bit groups of 32 with bf16 scales, 8-bit rows with fp32 scales;
the LM head's table once; the embedding reads one row).

Needs bundles/smollm2-{dense,fasp30}-pte-8da4w (`benchmarks/export.py --reuse`); makes
bundles/smollm2-control-pte-8da4w if absent. Writes benchmarks/results/decode_profile.{json,md} (``--name``
changes the stem).
``--only control`` times one bundle and writes nothing, for a profiler:

    perf record -F 5000 -o /tmp/control.perf .venv/bin/python benchmarks/decode_profile.py --only control --rounds 300
    perf report -i /tmp/control.perf --sort dso,sym
"""

from __future__ import annotations

import os

THREADS = 2
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before torch loads (see fasp_edge.runtime_bench.measure.torch_threads_for)
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONTROL_WIDTH = 64
PROMPT, STEPS = 64, 64
BAR = 1.25  # issue 11: FASP-0.3 pte-8da4w decode over dense pte-8da4w


def weight_bytes_per_token(manifest: dict) -> dict:
    """The bytes of weights one decode step reads, from the manifest's shapes and 8da4w recipe."""
    model, quant = manifest["model"], manifest["artifacts"]["pte"]["quantization"]
    keep8 = quant["recipe"]["keep_8bit"]
    hidden, vocab = model["hidden_size"], model["vocab_size"]

    def size(out_f: int, in_f: int, eight: bool) -> float:
        return out_f * (in_f + 4) if eight else out_f * in_f * 0.5 + out_f * (in_f // 32) * 2

    layers = 0.0
    for ly in model["layers"]:
        h, kv, d, dv, f = ly["num_heads"], ly["num_kv_heads"], ly["head_dim"], ly["v_head_dim"], ly["ffn_dim"]
        for name, o, i in (("q_proj", h * d, hidden), ("k_proj", kv * d, hidden), ("v_proj", kv * dv, hidden),
                           ("o_proj", hidden, h * dv), ("gate_proj", f, hidden), ("up_proj", f, hidden),
                           ("down_proj", hidden, f)):
            layers += size(o, i, name in keep8)
    head = size(vocab, hidden, quant["recipe"]["lm_head"] == "8bit")
    return {"layers_mb": round(layers / 1e6, 2), "lm_head_mb": round(head / 1e6, 2),
            "total_mb": round((layers + head) / 1e6, 2)}


def make_control(dense: Path, out: Path) -> None:
    """SmolLM2's config with hidden and MLP widths CONTROL_WIDTH, random weights (seed 0), exported like ``dense``."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from fasp_edge.checkpoints.loading import default_model_folder

    src = default_model_folder()
    cfg = AutoConfig.from_pretrained(src)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads  # kept: only the widths around the heads shrink
    cfg.hidden_size = cfg.intermediate_size = CONTROL_WIDTH
    torch.manual_seed(0)
    model_dir = out.with_name(out.name + ".model")
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(src).save_pretrained(model_dir)
    settings = json.loads((dense / "manifest.json").read_text())["export_settings"]
    print(f"exporting the control into {out} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "fasp_edge.cli", "export", str(model_dir), "--formats", "pte",
                    "--quant", settings["quant"], "--max-context", str(settings["max_context"]), "-o", str(out)],
                   check=True)


def time_rounds(folders: list[Path], rounds: int) -> dict[str, list[float]]:
    """ms per decode step of each bundle, one value per round, rounds interleaved in this process."""
    import torch

    from fasp_edge.runtime.executorch import PteModel, set_threadpool_size
    from fasp_edge.runtime.bundle import pte_data_path

    set_threadpool_size(THREADS)
    models = {}
    for f in folders:
        manifest = json.loads((f / "manifest.json").read_text())
        models[f.name] = PteModel(f / manifest["artifacts"]["pte"]["file"], data_path=pte_data_path(f, manifest))
    prompt = torch.arange(1, PROMPT + 1).reshape(1, -1)
    out = {name: [] for name in models}
    names = list(models)
    for r in range(rounds + 1):  # round 0 warms every model up and is not counted
        for name in names if r % 2 else names[::-1]:
            m = models[name]
            m.step(prompt, 0)
            tok = torch.tensor([[5]])
            t0 = time.perf_counter()
            for p in range(PROMPT, PROMPT + STEPS):
                m.step(tok, p)
            if r:
                out[name].append(1e3 * (time.perf_counter() - t0) / STEPS)
        print(f"round {r}/{rounds}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", default=str(REPO / "bundles"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--name", default="decode_profile", help="file stem of the results (default decode_profile)")
    ap.add_argument("--only", choices=("control", "dense", "fasp30"),
                    help="time this bundle alone and write nothing (to run under a profiler, e.g. `perf record`)")
    args = ap.parse_args()
    root = Path(args.bundles)
    dense, fasp, control = (root / f"smollm2-{m}-pte-8da4w" for m in ("dense", "fasp30", "control"))
    for b in (dense, fasp):
        if not (b / "manifest.json").is_file():
            sys.exit(f"decode_profile.py: missing {b} (make it with `python benchmarks/export.py --reuse`)")
    if not (control / "manifest.json").is_file():
        make_control(dense, control)
    if args.only:
        ms = time_rounds([root / f"smollm2-{args.only}-pte-8da4w"], args.rounds)
        print({k: round(statistics.median(v), 4) for k, v in ms.items()})
        return
    folders = [control, dense, fasp]
    ms = time_rounds(folders, args.rounds)
    med = {k: statistics.median(v) for k, v in ms.items()}
    per_round = lambda a, b: statistics.median(x / y for x, y in zip(ms[a], ms[b]))  # noqa: E731
    fixed = med[control.name]
    w_dense, w_fasp = med[dense.name] - fixed, med[fasp.name] - fixed
    need = (w_dense - BAR * w_fasp) / (BAR - 1)  # the fixed ms at which (f + w_dense) / (f + w_fasp) = BAR
    manifests = {f.name: json.loads((f / "manifest.json").read_text()) for f in folders}
    wb = {k: weight_bytes_per_token(m) for k, m in manifests.items()}
    doc = {
        "command": "benchmarks/decode_profile.py", "rounds": args.rounds, "threads": THREADS,
        "positions": [PROMPT, PROMPT + STEPS - 1],
        "ms_per_step": {k: {"median": round(med[k], 4), "values": [round(x, 4) for x in v]} for k, v in ms.items()},
        "weight_bytes_per_step": wb,
        "lowering": {k: {x: m["artifacts"]["pte"]["lowering"][x] for x in ("delegate_partitions", "delegated_nodes",
                                                                          "non_delegated_op_count")}
                     for k, m in manifests.items()},
        "fixed_ms": round(fixed, 4),
        "fixed_share_of_dense_step": round(fixed / med[dense.name], 4),
        "weight_ms": {dense.name: round(w_dense, 4), fasp.name: round(w_fasp, 4)},
        "fasp_over_dense_decode": round(per_round(dense.name, fasp.name), 4),
        "fasp_over_dense_weight_time": round(w_dense / w_fasp, 4),
        "fasp_over_dense_weight_bytes": round(wb[dense.name]["total_mb"] / wb[fasp.name]["total_mb"], 4),
        "bar": BAR,
        "fixed_ms_the_bar_needs": round(need, 4),
        "host": {"cpu": _cpu(), "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"`.venv/bin/python benchmarks/decode_profile.py` ({doc['host']['cpu']}, {THREADS} threads, one process, "
        f"{args.rounds} interleaved rounds of a {PROMPT}-token prefill and {STEPS} decode steps; median ms per step)",
        "",
        "| bundle | ms / decode step | weight MB read / step | delegate partitions | ops outside them |",
        "|---|---|---|---|---|",
    ]
    for f in folders:
        lo = doc["lowering"][f.name]
        lines.append(f"| {f.name} | {med[f.name]:.3f} | {wb[f.name]['total_mb']:.1f} | {lo['delegate_partitions']} | "
                     f"{lo['non_delegated_op_count']} |")
    lines += [
        "",
        f"- fixed cost of a step (the control): {fixed:.3f} ms, {100 * doc['fixed_share_of_dense_step']:.0f}% of the "
        "dense step",
        f"- weight-dependent time: dense {w_dense:.3f} ms, FASP-0.3 at most {w_fasp:.3f} ms: "
        f"{doc['fasp_over_dense_weight_time']:.3f}x (weight bytes {doc['fasp_over_dense_weight_bytes']:.3f}x)",
        f"- FASP-0.3 / dense decode: {doc['fasp_over_dense_decode']:.3f}x (median of per-round ratios)",
        f"- for {BAR}x the fixed cost would have to fall to {need:.3f} ms "
        f"({100 * need / fixed:.0f}% of today's)" if need > 0 else
        f"- {BAR}x is out of reach even at zero fixed cost: the weights alone give "
        f"{doc['fasp_over_dense_weight_time']:.3f}x",
    ]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu() -> str:
    from fasp_edge.runtime_bench.measure import host_facts

    return host_facts()["cpu_model"]


if __name__ == "__main__":
    main()
