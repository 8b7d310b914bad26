"""Where the 4-bit export loses quality, each suspect measured alone, and what the recipes recover.

    .venv/bin/python benchmarks/quant_quality.py            # ~40 min on 2 cores (SmolLM2 dense and FASP-0.3)
    .venv/bin/python benchmarks/quant_quality.py --only calibrated   # the calibrated rows only (~20 min)

SmolLM2-135M-Instruct (dequantized Q4_1), dense and FASP-0.3 (``--align 32``, pruned with 128 x 512 tokens
of WikiText-2 validation if ``out/smollm2-fasp30-a32`` is absent). Perplexity on the first 4 windows of 512
tokens of WikiText-2 test, computed in eager PyTorch through the export decoder, quantized with torchao's
tensors (the suspects) or with fasp-edge's recipes (``fasp_edge/export/quantize.py``: the reference
implementations of the ops the artifact runs, up to XNNPACK's bf16 scales and rounding), as a ratio to the
same model in fp32.

The calibrated recipes calibrate on 32 x 256 tokens of WikiText-2 validation (what ``fasp-edge export --calib-text
wiki.valid.tokens`` draws). Their choices (which Linears stay 8-bit, the LM head's precision) are made on the
``selection`` column: 8 windows of 512 tokens of WikiText-2 validation that share no position with those
calibration windows. The test column is reported, never chosen on.
The artifact itself is measured through its runtime by ``fasp-edge export --quality-text``; its manifest
figures are quoted in README. Writes benchmarks/results/quant_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASP_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
TEST = DATA / "wikitext2" / "wiki.test.joined.txt"
CALIB = DATA / "wikitext2" / "wiki.valid.tokens"


def variants():
    """name -> (what it isolates, function quantizing an export decoder in place given calibration windows)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    from fasp_edge.export.quantize import Recipe, quantize_decoder

    def lin(pred):
        return lambda m, fqn: isinstance(m, nn.Linear) and pred(fqn)

    def torchao(*steps):
        def apply(dec, windows):
            if dec.lm_head.weight is dec.embed_tokens.weight:
                dec.lm_head.weight = nn.Parameter(dec.lm_head.weight.detach().clone(), requires_grad=False)
            for flt, cfg in steps:
                quantize_(dec, cfg, filter_fn=flt)
        return apply

    def recipe(**kw):
        return lambda dec, windows: quantize_decoder(dec, Recipe(**kw), calibration=windows)

    a4 = lambda alg="affine": Int8DynamicActivationIntxWeightConfig(  # noqa: E731
        weight_dtype=torch.int4, weight_granularity=PerGroup(32), intx_choose_qparams_algorithm=alg)
    a8 = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    w4 = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    every = lin(lambda f: True)
    return {
        "fp32": ("reference", lambda dec, windows: None),
        "landed 8da4w": ("the landed export: torchao symmetric affine 4-bit, every Linear incl. the LM head",
                         torchao((every, a4()))),
        "activations alone": ("8-bit dynamic activations with 8-bit per-channel weights", torchao((every, a8))),
        "4-bit weights alone": ("4-bit symmetric weights, fp32 activations, every Linear", torchao((every, w4))),
        "4-bit LM head alone": ("only the LM head 4-bit (weights only)",
                                torchao((lin(lambda f: f == "lm_head"), w4))),
        "body 4-bit weights alone": ("every Linear but the LM head 4-bit (weights only)",
                                     torchao((lin(lambda f: f != "lm_head"), w4))),
        "qparams hqq_scale_only": ("the landed export with torchao's HQQ scales", torchao((every, a4("hqq_scale_only")))),
        "asymmetric, 4-bit head, fp32 embedding": ("asymmetric 4-bit groups (GroupOffsetLinear) everywhere",
                                                   recipe(qparams="asymmetric", lm_head="4bit", embedding="none")),
        "asymmetric, 4-bit head, 4-bit embedding": ("smallest", recipe(qparams="asymmetric", lm_head="4bit",
                                                                       embedding="4bit")),
        "asymmetric, 8-bit head, 8-bit embedding": ("`--qparams asymmetric`: the embedding reads the head's 8-bit "
                                                    "integers", recipe(qparams="asymmetric")),
        "asymmetric, 8-bit head, 4-bit embedding": ("", recipe(qparams="asymmetric", embedding="4bit")),
        "asymmetric, 8-bit head, fp32 embedding": ("", recipe(qparams="asymmetric", embedding="none")),
        "hqq_scale_only, 8-bit head, 4-bit embedding": ("the recipe on a symmetric grid",
                                                        recipe(qparams="hqq_scale_only", embedding="4bit")),
        "calibrated, down_proj 8-bit": ("symmetric groups, smoothing + GPTQ block after block",
                                        recipe(qparams="gptq", keep_8bit=["down_proj"])),
        "calibrated, down_proj + v_proj 8-bit": ("", recipe(qparams="gptq", keep_8bit=["down_proj", "v_proj"])),
        "calibrated, down_proj + v_proj + k_proj 8-bit (default)": ("the default recipe", recipe(qparams="gptq")),
        "calibrated, default, 4-bit head, 4-bit embedding": ("the default with a calibrated 4-bit LM head",
                                                             recipe(qparams="gptq", lm_head="4bit", embedding="4bit")),
    }


def selection_windows(tokenizer, text: str, calibration: torch.Tensor, n: int = 8, seqlen: int = 512) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens of ``text`` (validation) spread over it, none sharing a position with the
    ``calibration`` windows drawn from the same text (a window starting in the block before reaches into a block,
    so both must be free of any calibration window's start)."""
    from fasp_edge.pipeline.calibration import tokenize_text

    ids = tokenize_text(tokenizer, text)
    starts = {tuple(w[:8].tolist()) for w in calibration}
    blocks = ids[: ids.numel() // seqlen * seqlen].reshape(-1, seqlen)

    def free(b):
        t = b.tolist()
        return not any(tuple(t[i:i + 8]) in starts for i in range(len(t) - 7))

    ok = [i for i in range(1, blocks.shape[0]) if free(blocks[i]) and free(blocks[i - 1])]
    return blocks[ok[:: max(1, len(ok) // n)][:n]]


@torch.no_grad()
def perplexity(decoder, windows: torch.Tensor) -> float:
    nll = 0.0
    for w in windows:
        decoder.reset_cache()
        logits = decoder(w[None], torch.tensor([0]))[0, :-1].float()
        nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def main() -> None:
    warnings.simplefilter("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dense,fasp30")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--work", default=str(REPO / "out"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--only", default=None, help="measure only the variants whose name contains this (plus fp32) and "
                    "replace those rows in the existing results")
    args = ap.parse_args()
    from fasp_edge import load_model
    from fasp_edge.export.bundle import quantizer_windows
    from fasp_edge.models.decoder import ExportDecoder
    from fasp_edge.pipeline.calibration import read_text_file, tokenize_text

    torch.manual_seed(0)
    rows = []
    valid = read_text_file(CALIB)
    for name in args.models.split(","):
        source = None
        if name != "dense":
            ckpt = Path(args.work) / f"smollm2-{name}-a32"
            if not (ckpt / "config.json").exists():
                print(f"pruning {name} ...", file=sys.stderr, flush=True)
                subprocess.run([sys.executable, "-m", "fasp_edge.cli", "-q", "prune", "--sparsity",
                                str(int(name.removeprefix("fasp")) / 100), "--align", "32", "--calib-file", str(CALIB),
                                "--nsamples", "128", "--seqlen", "512", "-o", str(ckpt)], check=True)
            source = str(ckpt)
        loaded = load_model(source)
        ids = tokenize_text(loaded.tokenizer, read_text_file(TEST))
        windows = ids[: args.windows * 512].reshape(args.windows, 512)
        calib = quantizer_windows(loaded, text=valid, progress=False)[0]  # as `fasp-edge export --calib-text`
        select = selection_windows(loaded.tokenizer, valid, calib)
        base = sbase = None
        for label, (what, apply) in variants().items():
            if args.only and label != "fp32" and args.only not in label:
                continue
            t0 = time.perf_counter()
            decoder = ExportDecoder(copy.deepcopy(loaded.model), max_context=512, cache="static",
                                    full_logits=True).eval()
            apply(decoder, calib)
            ppl, sel = perplexity(decoder, windows), perplexity(decoder, select)
            base, sbase = base or ppl, sbase or sel
            rows.append({"model": name, "variant": label, "isolates": what, "perplexity": round(ppl, 3),
                         "ratio_to_fp32": round(ppl / base, 4), "selection_perplexity": round(sel, 3),
                         "selection_ratio_to_fp32": round(sel / sbase, 4),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name:7s} {label:56s} test {ppl / base:.4f}x  selection {sel / sbase:.4f}x", file=sys.stderr,
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only and (out / "quant_quality.json").exists():
        new = {(r["model"], r["variant"]): r for r in rows}
        old = json.loads((out / "quant_quality.json").read_text())["rows"]
        order = [k for k in variants()]
        merged = {(r["model"], r["variant"]): r for r in old if r["variant"] in order}
        merged.update(new)
        rows = sorted(merged.values(), key=lambda r: (args.models.split(",").index(r["model"])
                                                      if r["model"] in args.models.split(",") else 99,
                                                      order.index(r["variant"])))
    (out / "quant_quality.json").write_text(json.dumps({"windows": args.windows, "seqlen": 512,
                                                        "selection": "8 x 512 tokens of WikiText-2 validation apart "
                                                                     "from the calibration windows", "rows": rows},
                                                       indent=2) + "\n")
    lines = ["SmolLM2-135M-Instruct (dequantized Q4_1), WikiText-2 test, first "
             f"{args.windows} x 512 tokens, eager PyTorch, torchao tensors or the fasp-edge recipes "
             "(`benchmarks/quant_quality.py`); selection = 8 x 512 tokens of WikiText-2 validation that share no "
             "position with the 32 x 256 calibration windows (the calibrated recipes' choices are made there; "
             "'–': measured before that column existed).", "",
             "| model | variant | perplexity | / fp32 (test) | / fp32 (selection) | isolates |", "|---|---|---|---|---|---|"]
    sel = lambda r: f"{r['selection_ratio_to_fp32']:.3f}" if "selection_ratio_to_fp32" in r else "–"  # noqa: E731
    lines += [f"| {r['model']} | {r['variant']} | {r['perplexity']:.2f} | {r['ratio_to_fp32']:.3f} | {sel(r)} | "
              f"{r['isolates']} |" for r in rows]
    (out / "quant_quality.md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
