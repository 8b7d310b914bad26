"""The one list of library versions recorded wherever a figure or an artifact is written (bundle manifests,
bench results). Standard library only: the measuring child reads it before it loads any runtime."""

from __future__ import annotations

import platform
from importlib import metadata

from . import __version__

#: the libraries whose versions decide what an artifact contains or how fast it runs
LIBRARIES = ("fasp-edge", "torch", "torchao", "executorch", "transformers", "onnx", "onnxruntime", "onnxscript",
             "numpy")


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """``python`` and every library of :data:`LIBRARIES` (and ``extra``) with its installed version."""
    out = {"python": platform.python_version(), "fasp-edge": __version__}  # also from an uninstalled checkout
    for pkg in (*LIBRARIES, *extra):
        if pkg == "fasp-edge":
            continue
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
