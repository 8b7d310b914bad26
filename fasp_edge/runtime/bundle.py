"""Reading a bundle: the contract between export, the runtime, the benchmark and the Android app.

A bundle folder holds ``manifest.json``, ``model.pte`` (+ its ``model.ptd``) and/or ``model.onnx``
(+ ``model.onnx.data``), the Hugging Face ``tokenizer.json`` (+ config files) and, where the source has one,
the SentencePiece ``tokenizer.model``. The manifest records every file's sha256 and size; :func:`load_bundle`
refuses a bundle whose files are missing, changed or newer than this fasp-edge reads. Writing one is
:func:`fasp_edge.export.bundle.export_bundle`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import FORMATS
from ..errors import FaspError
from ..fsutil import sha256_file

BUNDLE_FORMAT_VERSION = 1
PTE_DATA_FILE = "model.ptd"  # the .pte's external constants (ExecuTorch named data), deduplicated


class BundleError(FaspError):
    """A bundle is missing, incomplete, corrupt or newer than this fasp-edge."""


@dataclass
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def formats(self) -> list[str]:
        return [f for f in FORMATS if f in self.manifest["artifacts"]]

    @property
    def max_context(self) -> int:
        return int(self.manifest["max_context"])


def load_bundle(path: str | Path, *, verify_hashes: bool = True) -> Bundle:
    """Read a bundle's manifest and check that every file is there with its recorded size and hash."""
    folder = Path(path)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{folder} has no manifest.json; it is not a fasp-edge bundle (make one with "
                          "`fasp-edge export`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {mpath}: {e}; re-export the bundle") from None
    if manifest.get("format") != "fasp-edge-bundle":
        raise BundleError(f"{mpath} is not a fasp-edge bundle manifest; re-export the bundle")
    version = manifest.get("format_version", 0)
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{folder} has bundle format {version}, newer than this fasp-edge reads "
                          f"({BUNDLE_FORMAT_VERSION}); upgrade fasp-edge")
    for name, rec in manifest.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise BundleError(f"{folder}: {name} is missing; the bundle is incomplete — re-export it")
        if f.stat().st_size != rec["bytes"]:
            raise BundleError(f"{folder}: {name} has {f.stat().st_size} bytes, the manifest says {rec['bytes']}; "
                              "the bundle is corrupt — re-export or re-copy it")
        if verify_hashes and sha256_file(f) != rec["sha256"]:
            raise BundleError(f"{folder}: {name} does not match its sha256 in the manifest; the bundle is corrupt "
                              "— re-export or re-copy it")
    return Bundle(folder, manifest)


def describe(bundle: Bundle) -> dict[str, Any]:
    """A short summary for the CLI."""
    m = bundle.manifest
    return {"path": str(bundle.path), "formats": bundle.formats, "quantization": m["quantization"],
            "max_context": m["max_context"], "bytes": sum(f["bytes"] for f in m["files"].values())}


def pte_data_path(folder: Path, manifest: dict) -> Path | None:
    """The ``.ptd`` holding a bundle's ``.pte`` constants, if it has one (fp32 bundles: the tied table once)."""
    name = manifest["artifacts"]["pte"].get("data_file")
    return None if name is None else Path(folder) / name


def artifact_path(bundle_dir: Path, manifest: dict, fmt: str) -> Path:
    """The model file of a bundle's ``fmt`` artifact."""
    return Path(bundle_dir) / manifest["artifacts"][fmt]["file"]


def artifact_bytes(manifest: dict, fmt: str) -> int:
    """Bytes of a bundle's ``fmt`` artifact: its model file and external data (what a device stores)."""
    art = manifest["artifacts"][fmt]
    files = [art["file"], *art.get("external_data", [])]
    return sum(manifest["files"][f]["bytes"] for f in files if f in manifest["files"])
