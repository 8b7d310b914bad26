"""Which Linears the 4-bit ONNX recipe (``--quant 4bit``) keeps at 8 bits, chosen on WikiText-2 VALIDATION: dense
SmolLM2-135M-Instruct (dequantized Q4_1) quantized by ``quantize_blockwise`` (calibrated: smoothing + GPTQ on
asymmetric blocks of 32, 32 x 256 tokens the model writes itself, seed 0), its dequantized weights written back into a
copy of the model, and that copy's perplexity on the first 4 x 512 tokens of WikiText-2 validation over the fp32
model's, eager in PyTorch (fp32 activations: ONNX Runtime's int8 compute comes on top, and each bundle's manifest
measures it through the artifact).

    .venv/bin/python benchmarks/onnx_4bit_recipes.py        # ~12 min on 2 cores

Writes benchmarks/results/onnx-4bit-recipes.{json,md}.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASP_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
VALID = DATA / "wikitext2" / "wiki.valid.tokens"
#: name -> the Linears kept at 8-bit blocks (the LM head is 8-bit in all)
VARIANTS = {"all 4-bit": [], "k/v 8-bit": ["k_proj", "v_proj"], "q/k/v/o 8-bit": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def main() -> None:
    import torch

    from fasp_edge import load_model
    from fasp_edge.export.bundle import quality_windows, quantizer_windows
    from fasp_edge.export.quantize import BlockQuantLinear, BlockRecipe, quantize_blockwise
    from fasp_edge.models.decoder import ExportDecoder
    from fasp_edge.pipeline.calibration import read_text_file

    loaded = load_model()
    calibration, _ = quantizer_windows(loaded, seqlen=256, progress=False)
    windows, _ = quality_windows(loaded, text=read_text_file(str(VALID)), windows=4, seqlen=512, progress=False)

    def nll(model) -> float:
        total = 0.0
        with torch.no_grad():
            for row in windows:
                lp = torch.log_softmax(model(row[None], use_cache=False).logits[0, :-1].float(), -1)
                total -= float(lp.gather(1, row[1:, None]).sum())
        return total / (windows.shape[0] * (windows.shape[1] - 1))

    base = nll(loaded.model)
    rows = {}
    for name, keep in VARIANTS.items():
        t0 = time.perf_counter()
        model = copy.deepcopy(loaded.model)
        static = ExportDecoder(model, max_context=512, cache="static").eval()
        originals = dict(static.named_modules())
        info = quantize_blockwise(static, BlockRecipe(keep_8bit=keep), calibration)
        with torch.no_grad():
            for fqn, mod in static.named_modules():
                if isinstance(mod, BlockQuantLinear):
                    originals[fqn].weight.copy_(mod.dequantized())
        rows[name] = {"keep_8bit": keep, "perplexity_ratio": round(math.exp(nll(model) - base), 4),
                      "linear_counts": info["linear_counts"], "seconds": round(time.perf_counter() - t0, 1)}
        print(name, rows[name], file=sys.stderr, flush=True)
    out = REPO / "benchmarks" / "results"
    doc = {"command": "python benchmarks/onnx_4bit_recipes.py", "text": "WikiText-2 validation, first 4 x 512 tokens",
           "reference_perplexity": round(math.exp(base), 3), "rows": rows}
    (out / "onnx-4bit-recipes.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# 4-bit ONNX recipe: which Linears stay 8-bit (dense SmolLM2, WikiText-2 validation, eager)", "",
             "`.venv/bin/python benchmarks/onnx_4bit_recipes.py`: perplexity of the dequantized weights over the fp32 "
             f"model's ({doc['reference_perplexity']}) on the first 4 x 512 tokens of WikiText-2 validation.", "",
             "| 8-bit Linears (and the LM head) | perplexity ratio | Linears per kind |", "|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['perplexity_ratio']:.4f} | {r['linear_counts']} |")
    (out / "onnx-4bit-recipes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
