"""Writing a bundle: every artifact of a model, verified, with its manifest (read by :mod:`fasp_edge.runtime.bundle`
for ``generate``, ``eval`` and the benchmark, and by the Android app).

A bundle folder holds ``manifest.json``, ``model.pte`` (+ ``model.ptd``) and/or ``model.onnx`` (+ ``model.onnx.data``),
the Hugging Face ``tokenizer.json`` (+ config files) and, where the source has one, the SentencePiece
``tokenizer.model``. The manifest records every file's sha256 and size, per-layer dims, vocab, BOS/EOS,
context length, precision and quantization, export settings, library versions, the measured parity against the
PyTorch model and each artifact's quality measured through its own runtime (:mod:`fasp_edge.runtime`). A bundle
is written in a temporary folder and renamed into place only after every artifact was verified: it is complete
and verified, or absent.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..artifacts import BY_KEY, CALIBRATED_QUANTS, FORMATS, QUANTS
from ..checkpoints.files import save_tokenizer
from ..checkpoints.loading import LoadedModel, cache_dir, sentencepiece_file
from ..errors import FaspError, InvalidArgument
from ..fsutil import atomic_file, atomic_output_dir, check_output_dir, sha256_file, state_dict_sha256
from ..models import family_for
from ..models.base import count_parameters
from ..models.decoder import ExportDecoder
from ..pipeline.calibration import (SELF_SAMPLER, SELF_TEMPERATURE, calibration_windows, self_generated_windows,
                                    tokenize_text)
from ..pipeline.perplexity import compare_log_probs
from ..runtime.bundle import BUNDLE_FORMAT_VERSION, PTE_DATA_FILE, Bundle, load_bundle
from ..runtime.executorch import PteModel
from ..runtime.onnx import OnnxModel, io_names
from ..runtime.parity import check_export_parity, logits_parity, parity_prompt, reference_logits
from ..versions import library_versions
from .executorch import export_pte, runner_metadata
from .onnx import ONNX_ATTENTION, export_onnx, export_onnx_4bit, kv_cache_layout, quantize_int8
from .quantize import DEFAULT_BLOCK_RECIPE, DEFAULT_RECIPE, BlockRecipe, Recipe, quantize_decoder

log = logging.getLogger(__name__)

QUALITY_WINDOWS = 4  # teacher-forced windows through each artifact's runtime ...
QUALITY_SEQLEN = 512  # ... of this many tokens (or the context length, if shorter)
#: the largest |Δlogits| a 4-bit ONNX graph may show against its own dequantized weights computed in fp32, as a
#: fraction of the largest |logit|, where ONNX Runtime rounds activations to int8 (``accuracy_level`` 4); with fp32
#: compute (``accuracy_level`` 0) the fp32 rule holds (:func:`~fasp_edge.runtime.parity.parity_tolerance`)
INT8_COMPUTE_TOLERANCE = 0.1
#: the manifest's precision words where the artifact computes other than in fp32 (ONNX Runtime's int8 compute)
QUANT_PRECISION = {"4bit": BY_KEY["onnx-4bit"].precision}
QUALITY_SEED = 1234  # seed of self-written quality text (not the calibration seeds 0, or agreement's)
CALIBRATION_WINDOWS = 32  # windows the calibrated 4-bit quantizer (the default, --qparams gptq) gathers statistics on ...
CALIBRATION_SEQLEN = 256  # ... of this many tokens (or the context length, if shorter) ...
CALIBRATION_SEED = 0  # ... self-written with this seed when no --calib-text is given


class ExportVerificationError(FaspError):
    """An exported artifact does not reproduce the PyTorch model."""


# --------------------------------------------------------------------------------------------------
def check_export_arguments(formats: list[str], quant: str) -> None:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InvalidArgument(f"unknown format {','.join(bad) or '(none)'}; choose from {', '.join(FORMATS)} "
                              "(e.g. --formats pte,onnx)")
    if quant not in QUANTS:
        raise InvalidArgument(f"unknown --quant {quant!r}; choose from {', '.join(QUANTS)}")
    cannot = [f for f in formats if f not in QUANTS[quant]]
    if cannot:
        raise InvalidArgument(f"--quant {quant} applies to {', '.join(QUANTS[quant])} only, not {', '.join(cannot)}; "
                              f"export {','.join(cannot)} in a separate bundle with --quant none")


def eos_ids_of(model, tokenizer) -> list[int]:
    """Every end-of-sequence id the tokenizer, the config and the generation config name."""
    ids: set[int] = set()
    for src in (tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return sorted(ids)


def _tokenizer_facts(tokenizer, folder: Path, source_spm: Path | None, eos_ids: list[int]) -> dict:
    """Save tokenizer files into ``folder``; say which file ExecuTorch's C++ runner must read."""
    save_tokenizer(tokenizer, folder)
    spec = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").exists() else {}
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    byte_level = '"ByteLevel"' in pre
    runner_file = "tokenizer.json" if byte_level else None
    if source_spm is not None and source_spm.is_file():
        shutil.copyfile(source_spm, folder / "tokenizer.model")
        if not byte_level:
            runner_file = "tokenizer.model"
    probe = tokenizer("a", add_special_tokens=True).input_ids
    adds_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    return {
        "hf_tokenizer": "tokenizer.json",
        "runner_tokenizer": runner_file,
        "runner_tokenizer_note": None if runner_file else
        "the tokenizer is neither byte-level BPE nor backed by a SentencePiece model; ExecuTorch's C++ runner "
        "cannot read it",
        "bos_id": tokenizer.bos_token_id,
        "eos_ids": eos_ids,
        "add_bos": bool(adds_bos),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def quality_windows(loaded: LoadedModel, *, text: str | None = None, windows: int = QUALITY_WINDOWS,
                    seqlen: int = QUALITY_SEQLEN, weights_sha256: str | None = None,
                    progress: bool = True) -> tuple[torch.Tensor, dict]:
    """The token windows an artifact's quality is measured on, and where they come from.

    The first ``windows`` windows of ``text`` (the perplexity protocol: tokenized without special tokens,
    non-overlapping), or, without text, ``windows`` sequences the model writes itself from BOS (seeded).
    Self-written windows are kept in the user cache (:func:`cached_self_written`), keyed by the model's
    weights and the sampling settings: every other export of the same model (another format or precision,
    e.g. a ``fasp-edge run``'s ONNX export after its 4-bit one) reads them instead of sampling them again
    (~70 s for SmolLM2-135M on 2 cores).
    """

    if text is None:
        return _self_written(loaded, windows, seqlen, QUALITY_SEED, weights_sha256, progress)
    ids = tokenize_text(loaded.tokenizer, text)
    n = min(windows, ids.numel() // seqlen)
    if n < 1:
        raise InvalidArgument(f"the quality text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                              "give a longer --quality-text file")
    return ids[: n * seqlen].reshape(n, seqlen), {"text": "given", "windows": n, "seqlen": seqlen}


def quantizer_windows(loaded: LoadedModel, *, text: str | None = None, windows: int = CALIBRATION_WINDOWS,
                      seqlen: int = CALIBRATION_SEQLEN, weights_sha256: str | None = None,
                      progress: bool = True) -> tuple[torch.Tensor, dict]:
    """The token windows the calibrated 4-bit recipe (the default, ``--qparams gptq``) calibrates on: windows of
    ``text`` drawn as pruning draws them
    (:func:`~fasp_edge.pipeline.calibration.calibration_windows`, seed :data:`CALIBRATION_SEED`; give validation
    text, never the text quality is measured on; a short text gives fewer windows), or text the model writes
    itself with that seed (another than the quality text's), cached like :func:`quality_windows`."""

    if text is None:
        return _self_written(loaded, windows, seqlen, CALIBRATION_SEED, weights_sha256, progress)
    available = tokenize_text(loaded.tokenizer, text).numel() // seqlen
    if available < 1:
        raise InvalidArgument(f"the calibration text gives no window of {seqlen} tokens; give a longer --calib-text file")
    cal = calibration_windows(loaded.tokenizer, text=text, nsamples=min(windows, available), seqlen=seqlen,
                              seed=CALIBRATION_SEED)
    return cal.windows, {"text": "given", "windows": cal.windows.shape[0], "seqlen": seqlen,
                         "seed": CALIBRATION_SEED}


def check_token_windows(windows, vocab_size: int, max_context: int, what: str = "calibration") -> torch.Tensor:
    """``windows`` as int64 ``[n, T]`` token ids, or a one-line error saying what is wrong with them."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0 \
            or windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise InvalidArgument(f"{what} windows must be a non-empty 2-D tensor of token ids [windows, tokens]")
    if windows.shape[1] > max_context:
        raise InvalidArgument(f"{what} windows of {windows.shape[1]} tokens exceed --max-context {max_context}")
    if int(windows.min()) < 0 or int(windows.max()) >= vocab_size:
        raise InvalidArgument(f"{what} windows hold token ids outside the model's vocabulary (0..{vocab_size - 1})")
    return windows.long()


def _self_written(loaded: LoadedModel, windows: int, seqlen: int, seed: int, weights_sha256: str | None,
                  progress: bool) -> tuple[torch.Tensor, dict]:
    """``windows`` sequences ``loaded``'s model writes from BOS with ``seed``, through :func:`cached_self_written`."""

    source = {"text": "self-generated", "seed": seed, "windows": windows, "seqlen": seqlen}
    tok = loaded.tokenizer
    key = {**source, "temperature": SELF_TEMPERATURE, "sampler": SELF_SAMPLER,
           "start": [tok.bos_token_id, tok.eos_token_id],
           "weights_sha256": weights_sha256 or state_dict_sha256(loaded.model), "torch": torch.__version__}
    return cached_self_written(key, lambda: self_generated_windows(
        loaded.model, tok, nsamples=windows, seqlen=seqlen, seed=seed, batch_size=windows,
        progress=progress).windows), source


def cached_self_written(key: dict, sample) -> torch.Tensor:
    """``sample()``'s token windows, kept in ``<cache>/quality/<sha256 of key>.pt`` with the key itself (checked
    on read). The entry is locked while it is read or sampled, so two exports of one model side by side sample
    once; it is written through :func:`~fasp_edge.fsutil.atomic_file`. A missing, unreadable or mismatching entry
    is sampled again; a cache that cannot be written is skipped."""

    blob = json.dumps(key, sort_keys=True)
    folder = cache_dir() / "quality"
    path = folder / f"{hashlib.sha256(blob.encode()).hexdigest()}.pt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{path.stem}.lock", "w")
    except OSError:  # a read-only cache: sample every time
        return sample()
    with lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: no advisory lock; at worst both processes sample
            pass
        try:
            saved = torch.load(path, weights_only=True)
            if saved.get("key") == blob:
                return saved["windows"]
        except Exception:  # noqa: BLE001  (absent or damaged: sample again)
            pass
        windows = sample()
        try:
            with atomic_file(path) as tmp:
                torch.save({"key": blob, "windows": windows}, tmp)
        except OSError:
            pass
        return windows


def reference_log_probs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """The PyTorch ``model``'s next-token log-probabilities on each window (``[T - 1, V]`` each): what
    :func:`artifact_quality` compares an artifact with, computed once (e.g. before the model is quantized in
    place)."""
    with torch.no_grad():
        return [torch.log_softmax(model(row.unsqueeze(0), use_cache=False).logits[0, :-1].float(), dim=-1)
                for row in windows]


def _reference_bytes(model, windows: torch.Tensor | None) -> int:
    """What :func:`reference_log_probs` of ``windows`` holds (float32)."""
    return 0 if windows is None else 4 * windows.shape[0] * (windows.shape[1] - 1) * model.config.vocab_size


def artifact_quality(model, step_fn, windows: torch.Tensor, progress: bool = True,
                     reference: list[torch.Tensor] | None = None) -> dict:
    """Teacher-forced quality of an artifact against the PyTorch model it was made from.

    Every window is fed through the artifact's own runtime one token per call (``step_fn(tokens, start)``,
    position 0 starting a new sequence), exactly as a generating app drives it; the PyTorch model scores
    the same windows (or ``reference``: its :func:`reference_log_probs` on them, computed earlier; then ``model``
    is not used). Returns the top-1 agreement of next-token predictions, the perplexity of both on the window
    text and their ratio (``exp`` of the mean NLL difference), and the mean KL(model || artifact).
    """

    n, length = windows.shape
    if reference is not None and len(reference) != n:
        raise ValueError(f"the reference scores {len(reference)} windows, not {n}")
    same = 0
    nll_ref = nll_art = kl = 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=n * length, desc="artifact quality", unit="tok", disable=not progress, leave=False)
    with torch.no_grad():
        for w, row in enumerate(windows):
            ref = reference[w] if reference is not None else reference_log_probs(model, row.unsqueeze(0))[0]
            got = []
            for i in range(length - 1):
                got.append(step_fn(row[i : i + 1].view(1, 1), i).float())
                bar.update(1)
            bar.update(1)
            art = torch.log_softmax(torch.stack(got), dim=-1)
            target = row[1:, None]
            s, k = compare_log_probs(ref, art)
            same, kl = same + s, kl + k
            nll_ref -= float(ref.gather(1, target).sum())
            nll_art -= float(art.gather(1, target).sum())
    bar.close()
    positions = n * (length - 1)
    return {"windows": n, "seqlen": length, "positions": positions, "top1_agreement": same / positions,
            "perplexity_ratio": math.exp((nll_art - nll_ref) / positions),
            "perplexity": math.exp(nll_art / positions), "reference_perplexity": math.exp(nll_ref / positions),
            "mean_kl": kl / positions, "seconds": round(time.perf_counter() - t0, 2)}


def export_bundle(loaded: LoadedModel, out: str | Path, *, formats: list[str] | tuple[str, ...] = FORMATS,
                  quant: str = "none", max_context: int = 512, overwrite: bool = False,
                  parity_prefill: int = 64, parity_steps: int = 32, recipe: Recipe | BlockRecipe | None = None,
                  quality_text: str | None = None, quality_windows_count: int = QUALITY_WINDOWS,
                  quality_tokens: torch.Tensor | None = None,
                  calibration_text: str | None = None, calibration: torch.Tensor | None = None,
                  progress: bool = True, keep_model: bool = True) -> Bundle:
    """Export ``loaded`` (dense or pruned) into a verified bundle at ``out``.

    ``recipe`` says how ``quant="8da4w"`` (a :class:`~.quantize.Recipe`, default :data:`~.quantize.DEFAULT_RECIPE`)
    or ``quant="4bit"`` (a :class:`~.quantize.BlockRecipe`, default :data:`~.quantize.DEFAULT_BLOCK_RECIPE`)
    quantizes. Every
    artifact's quality is measured through its own runtime on ``quality_windows_count`` windows of
    ``quality_text``, of the given token windows ``quality_tokens`` ``[n, T]`` (e.g. the held-out text a
    ``fasp-edge run`` has the dense model write, so every artifact of the run is measured on one text; the first
    ``quality_windows_count`` windows of at most ``max_context`` tokens), or of text the model writes itself,
    and recorded in the manifest; 0 skips it. A recipe
    with ``qparams="gptq"`` calibrates on ``calibration`` (token windows ``[n, T]``, e.g. a ``fasp-edge run``'s
    calibration stage's), else on :func:`quantizer_windows` of ``calibration_text`` (validation text; without
    it, text the model writes itself).

    ``keep_model=False`` lets a quantized export (8da4w, 4bit) quantize ``loaded.model`` in place for its last
    format instead of a copy (the copy is a whole fp32 model: a 1.5B model's 7 GB of peak memory), after the
    PyTorch model's logits on the parity prompt and the quality windows are computed (where those take less
    memory than the copy); ``loaded.model`` must not be used afterwards. The bundle is the same either way.
    """
    check_export_arguments(list(formats), quant)
    recipe = recipe or (DEFAULT_BLOCK_RECIPE if quant == "4bit" else DEFAULT_RECIPE)
    if isinstance(recipe, BlockRecipe) != (quant == "4bit"):
        raise InvalidArgument(f"--quant {quant} takes a {'BlockRecipe' if quant == '4bit' else 'Recipe'}, "
                              f"not a {type(recipe).__name__}")
    recipe.check()
    formats = [f for f in FORMATS if f in set(formats)]
    check_output_dir(out, overwrite)
    if max_context < parity_prefill + parity_steps + 1:
        raise InvalidArgument(f"--max-context {max_context} is below the {parity_prefill + parity_steps + 1} "
                              "positions the parity check needs; raise it")
    if quality_text is not None and quality_tokens is not None:
        raise InvalidArgument("give the quality text or quality token windows, not both")
    model = loaded.model.eval()
    prompt = parity_prompt(model.config.vocab_size, parity_prefill)
    settings = {"max_context": max_context, "quant": quant, "formats": list(formats), "dtype": "float32",
                "parity_prefill": parity_prefill, "parity_steps": parity_steps}
    if quant in CALIBRATED_QUANTS:
        settings["recipe"] = dataclasses.asdict(recipe)
    weights_sha256 = state_dict_sha256(model)
    quality_set, quality_source = _quality_text(loaded, quality_text, quality_tokens, quality_windows_count,
                                                max_context, weights_sha256, progress)
    if quality_source is not None:
        settings["quality"] = quality_source
    calibration, calibration_source = _quantizer_calibration(loaded, quant, recipe, calibration, calibration_text,
                                                             max_context, weights_sha256, progress)
    if calibration_source is not None:
        settings["calibration"] = calibration_source
    artifacts: dict[str, dict] = {}
    steps = tqdm(total=len(formats) + 1, desc="export", disable=not progress)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        decoder_parity, dims = _check_decoder(model, max_context, prompt, parity_steps)
        about = _model_facts(loaded, dims, weights_sha256)  # read before a quantization in place changes the model
        eos_ids = eos_ids_of(model, loaded.tokenizer)
        steps.update(1)
        for i, fmt in enumerate(formats):
            t0 = time.perf_counter()
            in_place = not keep_model and quant in CALIBRATED_QUANTS and i == len(formats) - 1 \
                and _reference_bytes(model, quality_set) < 4 * about["parameters"]  # else the copy costs less
            ref_logits = ref_quality = None
            if in_place:  # what the checks compare with, from the fp32 model before it is quantized
                ref_logits = reference_logits(model, prompt, parity_steps)
                ref_quality = reference_log_probs(model, quality_set) if quality_set is not None else None
            if fmt == "pte":
                info, runtime = _export_pte_artifact(model, tmp, max_context, quant, prompt, parity_steps,
                                                     loaded.tokenizer, recipe, calibration, progress,
                                                     in_place=in_place, reference=ref_logits)
            else:
                info, runtime = _export_onnx_artifact(model, tmp, max_context, quant, prompt, parity_steps, recipe,
                                                      calibration, progress, in_place=in_place, reference=ref_logits)
            info["export_seconds"] = round(time.perf_counter() - t0, 2)
            if quality_set is not None:
                info["quality"] = {**quality_source, **artifact_quality(model, runtime.step, quality_set,
                                                                        progress=progress, reference=ref_quality)}
            del ref_logits, ref_quality
            artifacts[fmt] = info
            steps.update(1)
        tok = _tokenizer_facts(loaded.tokenizer, tmp, sentencepiece_file(loaded), eos_ids)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = _manifest(about, max_context, tok, quant, settings, artifacts, decoder_parity, files)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    steps.close()
    return load_bundle(out)


def _quality_text(loaded: LoadedModel, text: str | None, tokens: torch.Tensor | None, count: int, max_context: int,
                  weights_sha256: str, progress: bool) -> tuple[torch.Tensor | None, dict | None]:
    """The windows every artifact's quality is measured on, and where they come from (none when ``count`` is 0)."""
    if count <= 0:
        return None, None
    if tokens is not None:
        windows = check_token_windows(tokens, loaded.model.config.vocab_size, max_context, what="quality")[:count]
        return windows, {"text": "given windows", "windows": windows.shape[0], "seqlen": windows.shape[1]}
    return quality_windows(loaded, text=text, windows=count, seqlen=min(QUALITY_SEQLEN, max_context),
                           weights_sha256=weights_sha256, progress=progress)


def _quantizer_calibration(loaded: LoadedModel, quant: str, recipe: Recipe, calibration: torch.Tensor | None,
                           text: str | None, max_context: int, weights_sha256: str,
                           progress: bool) -> tuple[torch.Tensor | None, dict | None]:
    """The windows a calibrated 4-bit recipe quantizes with, and where they come from (none for other exports)."""
    if quant not in CALIBRATED_QUANTS or not recipe.calibrated:
        return None, None
    if calibration is not None:
        calibration = check_token_windows(calibration, loaded.model.config.vocab_size, max_context)
        return calibration, {"text": "given windows", "windows": calibration.shape[0], "seqlen": calibration.shape[1]}
    return quantizer_windows(loaded, text=text, seqlen=min(CALIBRATION_SEQLEN, max_context),
                             weights_sha256=weights_sha256, progress=progress)


def _check_decoder(model, max_context: int, prompt: torch.Tensor, steps: int) -> tuple[dict, list[dict]]:
    """The export decoder itself, in fp32, against transformers (before any artifact is made); its per-layer dims."""
    ref_decoder = ExportDecoder(model, max_context=max_context, cache="static", full_logits=True).eval()
    parity = check_export_parity(model, ref_decoder, prompt, steps, referee=True)
    if not parity.pop("passed"):
        referee = parity.get("float64", {})
        why = (f"; float64 referee: {referee['candidate_vs_float64']:.2e} from float64 (> {referee['tolerance']:.1e})"
               if "tolerance" in referee else f"; no float64 referee ({referee['skipped']})" if referee else "")
        raise ExportVerificationError(f"the export decoder differs from the model by {parity['max_abs_diff']:.2e} "
                                      f"(> {parity['tolerance']:.1e}){why}; please report it")
    return parity, [dataclasses.asdict(d) for d in ref_decoder.dims]


def _model_facts(loaded: LoadedModel, dims: list[dict], weights_sha256: str) -> dict:
    """The manifest's ``model``: what the bundle was made from."""
    model = loaded.model
    cfg = model.config
    return {
        "family": family_for(model).name,
        "model_type": cfg.model_type,
        "source": str(loaded.source),
        "fasp": getattr(cfg, "fasp", None),
        "num_layers": len(dims),
        "hidden_size": cfg.hidden_size,
        "layers": dims,
        "vocab_size": cfg.vocab_size,
        "parameters": count_parameters(model),
        "weights_sha256": weights_sha256,  # ties the bundle to its PyTorch model (bench --backends torch)
    }


def _manifest(about: dict, max_context: int, tok: dict, quant: str, settings: dict, artifacts: dict,
              decoder_parity: dict, files: dict) -> dict:
    """``manifest.json``: what the bundle holds, what it was made from (``about``: :func:`_model_facts`) and how,
    and what was measured of it."""
    return {
        "format": "fasp-edge-bundle",
        "format_version": BUNDLE_FORMAT_VERSION,
        "created_unix": int(time.time()),
        "model": about,
        "max_context": max_context,
        "tokenizer": tok,
        "precision": "float32" if quant == "none" else QUANT_PRECISION.get(quant, f"float32 activations, {quant} weights"),
        "quantization": quant,
        "export_settings": settings,
        "artifacts": artifacts,
        "parity": {"decoder_vs_transformers": decoder_parity, **{fmt: a["parity"] for fmt, a in artifacts.items()}},
        "quality": {fmt: a["quality"] for fmt, a in artifacts.items() if "quality" in a},
        "files": files,
        "versions": library_versions(),
    }


def _verify(kind: str, parity: dict, quant: str) -> None:
    if quant == "none" and parity["max_abs_diff"] > parity["tolerance"]:
        raise ExportVerificationError(f"the {kind} artifact differs from the PyTorch model by "
                                      f"{parity['max_abs_diff']:.2e} (> {parity['tolerance']:.1e}); nothing was written")
    if not torch.isfinite(torch.tensor(parity["max_abs_diff"])):
        raise ExportVerificationError(f"the {kind} artifact produces non-finite logits; nothing was written")


def _export_pte_artifact(model, tmp: Path, max_context: int, quant: str, prompt, steps: int, tokenizer,
                         recipe: Recipe, calibration: torch.Tensor | None = None, progress: bool = False,
                         in_place: bool = False, reference: list[torch.Tensor] | None = None):
    """The ``.pte`` artifact of ``model`` in ``tmp``, checked against the model (or ``reference``, its
    :func:`~fasp_edge.runtime.parity.reference_logits`: ``in_place`` quantizes ``model`` itself, not a copy)."""
    src = copy.deepcopy(model) if quant != "none" and not in_place else model
    decoder = ExportDecoder(src, max_context=max_context, cache="static").eval()
    release = (lambda: _release_replaced(model, decoder)) if in_place else None  # block by block, and at the end
    quantization = quantize_decoder(decoder, recipe, calibration, progress, release) if quant == "8da4w" else None
    if release is not None and quantization is not None:
        release()
    meta = runner_metadata(decoder, tokenizer.bos_token_id, eos_ids_of(model, tokenizer))
    # constants in model.ptd, where identical buffers are stored once: the tied embedding / LM head table
    # (fp32, or 8da4w's 8-bit head integers that the 8-bit embedding kernel reads too) is written once
    lowering = export_pte(decoder, tmp / "model.pte", meta, data_file=PTE_DATA_FILE)
    pte = PteModel(tmp / "model.pte", data_path=tmp / PTE_DATA_FILE)
    parity = logits_parity(model, pte.step, prompt, steps, reference=reference)
    _verify("ExecuTorch", parity, quant)
    info = {"file": "model.pte", "backend": "xnnpack", "method": "forward(tokens[1,T], input_pos[1]) -> logits[1,V]",
            "metadata": meta, "parity": parity, "lowering": lowering, "data_file": PTE_DATA_FILE,
            "external_data": [PTE_DATA_FILE]}
    if quantization is not None:
        info["quantization"] = quantization
    return info, pte


def _release_replaced(model: torch.nn.Module, decoder: torch.nn.Module) -> None:
    """Free the fp32 weights of ``model``'s modules that quantization in place replaced in ``decoder``: the
    decoder's blocks re-use the model's modules, and a replaced Linear is rebound in the decoder only, so the model
    would keep its fp32 weights alive through the export. A parameter the decoder still holds (a tied table) stays;
    rebinding a parameter's data never frees a storage that another tensor still reads."""
    live = {id(m) for m in decoder.modules()}
    held = {id(t) for t in [*decoder.parameters(), *decoder.buffers()]}
    for mod in model.modules():
        if id(mod) in live or not isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        for param in mod.parameters(recurse=False):
            if id(param) not in held:
                param.data = torch.empty(0, dtype=param.dtype)


def _export_onnx_artifact(model, tmp: Path, max_context: int, quant: str, prompt, steps: int,
                          recipe: BlockRecipe | Recipe | None = None, calibration: torch.Tensor | None = None,
                          progress: bool = False, in_place: bool = False, reference: list[torch.Tensor] | None = None):
    """The ONNX artifact of ``model`` in ``tmp``, checked against the model (or ``reference``, its
    :func:`~fasp_edge.runtime.parity.reference_logits`: ``in_place`` lets the 4-bit export quantize ``model``
    itself, not a copy)."""
    decoder = ExportDecoder(model, max_context=max_context, cache="io", attention=ONNX_ATTENTION[quant]).eval()
    quantization = dequantized = None
    if quant == "int8":
        work = tmp / "fp32"
        work.mkdir()
        export_onnx(decoder, work / "model.onnx")
        quantize_int8(work / "model.onnx", tmp / "model.onnx")
        shutil.rmtree(work)
    elif quant == "4bit":
        quantization, dequantized = export_onnx_4bit(model, tmp / "model.onnx", max_context=max_context,
                                                     recipe=recipe, calibration=calibration, progress=progress,
                                                     in_place=in_place)
    else:
        export_onnx(decoder, tmp / "model.onnx")
    onnx_model = OnnxModel(tmp / "model.onnx")
    parity = logits_parity(model, onnx_model.step, prompt, steps, reference=reference)
    _verify("ONNX", parity, quant)
    inputs, outputs = io_names(len(decoder.blocks))
    data = [p.name for p in tmp.iterdir() if p.name.startswith("model.onnx") and p.name != "model.onnx"]
    info = {"file": "model.onnx", "external_data": sorted(data), "inputs": inputs, "outputs": outputs,
            "kv_cache": kv_cache_layout(decoder), "opset": _onnx_opset(tmp / "model.onnx"), "parity": parity}
    if quantization is not None:
        info["quantization"] = quantization
        info["parity_dequantized"] = _check_dequantized(dequantized, onnx_model, prompt, steps, recipe)
    return info, onnx_model


def _check_dequantized(reference, onnx_model: OnnxModel, prompt, steps: int, recipe: BlockRecipe) -> dict:
    """The 4-bit graph against the same weights dequantized and computed in fp32 (the PyTorch copy they were
    written from): within :func:`~fasp_edge.runtime.parity.parity_tolerance` with fp32 compute, within
    :data:`INT8_COMPUTE_TOLERANCE` of the logit scale with int8 compute; else nothing is written."""
    parity = logits_parity(reference, onnx_model.step, prompt, steps)
    if recipe.accuracy_level >= 2:  # int8 (4) or fp16/bf16 (2, 3) compute
        parity["tolerance"] = INT8_COMPUTE_TOLERANCE * parity["max_abs_logit"]
        parity["tolerance_rule"] = f"{INT8_COMPUTE_TOLERANCE} x max |logit| (accuracy_level {recipe.accuracy_level})"
    if not parity["max_abs_diff"] <= parity["tolerance"]:
        raise ExportVerificationError(f"the 4-bit ONNX graph differs from its own dequantized weights by "
                                      f"{parity['max_abs_diff']:.2e} (> {parity['tolerance']:.1e}); nothing was written")
    return parity


def _onnx_opset(path: Path) -> int | None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


