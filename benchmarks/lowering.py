"""Lowering benchmark: where `export_pte`'s seconds go, and what each of our changes to ExecuTorch's lowering saves.

    .venv/bin/python benchmarks/lowering.py                 # dense SmolLM2 8da4w, ~6 min alone on 2 cores
    .venv/bin/python benchmarks/lowering.py --quant none --layers 6

Exports the dense default model (optionally cut to its first --layers layers) with `export_pte` three times in one
process: ExecuTorch 1.4.1's own decomposition and edge passes ("stock"), our single decomposition pass
("one-pass"), and that plus the edge passes gated on the nodes they rewrite ("ours", what `export_pte` runs); XNNPACK's
lean preprocess pass list is on in all three. Each mode records its seconds, the seconds of the main stages
(torch.export, run_decompositions, the edge program, partitioning, XNNPACK preprocess, to_executorch) and of every
ExecuTorch graph pass by class, and the sha256 of the .pte and .ptd it wrote: the three must be byte-identical.
Writes benchmarks/results/lowering.json and lowering.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("stock", "one-pass", "ours")


@contextlib.contextmanager
def _stage_timer(seconds: dict, calls: collections.Counter):
    """Time the main lowering stages and every ExecuTorch graph pass (by class) while the block runs."""
    import torch
    from executorch.backends.xnnpack import xnnpack_preprocess
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import pass_base
    from executorch.exir.program import _program

    patched = []

    def wrap(owner, name, label):
        """Time ``owner.name``; ``label`` is the stage's name, or a function of the call's first argument."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            key = label(args[0]) if callable(label) else label
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - t0
                calls[key] += 1

        setattr(owner, name, timed)
        patched.append((owner, name, original))

    wrap(torch.export, "export", "torch.export")
    wrap(_program.ExportedProgram, "run_decompositions", "run_decompositions")
    wrap(_program, "_generate_edge_program", "edge program (edge passes)")
    wrap(XnnpackPartitioner, "partition", "XNNPACK partition")
    wrap(xnnpack_preprocess.XnnpackBackend, "preprocess", "XNNPACK preprocess (per partition)")
    wrap(_program.EdgeProgramManager, "to_executorch", "to_executorch")
    wrap(pass_base._ExportPassBase, "__call__", lambda self: f"pass {type(self).__name__}")
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def _lower(model, quant: str, mode: str) -> dict:
    from fasp_edge.export import executorch as et
    from fasp_edge.models.decoder import ExportDecoder
    from fasp_edge.export.quantize import quantize_decoder

    decoder = ExportDecoder(model, max_context=512, cache="static").eval()
    if quant == "8da4w":
        quantize_decoder(decoder)
    seconds, calls = collections.defaultdict(float), collections.Counter()
    switches = []
    if mode != "ours":
        switches.append(("_applicable_edge_passes", et._applicable_edge_passes))
    if mode == "stock":
        switches.append(("_one_decomposition_pass", et._one_decomposition_pass))
    for name, _ in switches:
        setattr(et, name, contextlib.nullcontext)
    try:
        with tempfile.TemporaryDirectory() as tmp, _stage_timer(seconds, calls):
            t0 = time.perf_counter()
            info = et.export_pte(decoder, Path(tmp) / "model.pte", et.runner_metadata(decoder, 1, [2]),
                                 data_file="model.ptd")
            total = time.perf_counter() - t0
            digests = {f: hashlib.sha256((Path(tmp) / f).read_bytes()).hexdigest() for f in ("model.pte", "model.ptd")}
    finally:
        for name, original in switches:
            setattr(et, name, original)
    return {"mode": mode, "seconds": round(total, 1), "partitions": info["delegate_partitions"], "sha256": digests,
            "stages": {k: {"seconds": round(v, 2), "calls": calls[k]} for k, v in
                       sorted(seconds.items(), key=lambda kv: -kv[1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", choices=("none", "8da4w"), default="8da4w")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0 = all)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    import copy
    import warnings

    from fasp_edge import load_model

    warnings.simplefilter("ignore")
    model = load_model().model
    if args.layers:
        model.model.layers = model.model.layers[:args.layers]
        model.config.num_hidden_layers = args.layers
    rows = []
    for mode in MODES:
        print(f"lowering ({mode}) ...", file=sys.stderr, flush=True)
        rows.append(_lower(copy.deepcopy(model), args.quant, mode))
        print(f"  {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    identical = len({json.dumps(r["sha256"], sort_keys=True) for r in rows}) == 1
    layers = args.layers or len(model.model.layers)
    result = {"command": "python benchmarks/lowering.py " + " ".join(sys.argv[1:]), "quant": args.quant,
              "layers": layers, "identical_files": identical, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowering.json").write_text(json.dumps(result, indent=2) + "\n")
    labels = list(dict.fromkeys(k for r in rows for k in r["stages"]))
    lines = [f"Dense SmolLM2-135M-Instruct, {layers} layers, `export_pte` at quant {args.quant}, one process, alone "
             f"(`{result['command']}`). .pte and .ptd byte-identical across modes: {'yes' if identical else 'NO'}.", "",
             "| stage (seconds, calls) | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES),
             "| **export_pte** | " + " | ".join(f"**{r['seconds']}**" for r in rows) + " |"]
    for label in labels:
        cells = []
        for r in rows:
            st = r["stages"].get(label)
            cells.append(f"{st['seconds']:.1f} (x{st['calls']})" if st else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (out / "lowering.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
