"""fasp-edge: FASP structured pruning and on-device export of causal language models.

Importing the package loads no heavy library (torch, transformers, a runtime): the public names below are
resolved on first use, so a process that only needs the standard library (the benchmark's measuring child,
before it applies its profile) can import ``fasp_edge`` submodules without loading torch.
"""

import logging as _logging

# Known import-time noise of pinned dependencies, not actionable by a user: torchao (pulled in by
# transformers' quantizer registry) reports its optional CUDA kernels missing on CPU machines, and
# torch warns about torchao's Enum pytree registrations.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from .errors import FaspError, ModelFamilyNotSupported

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "calibration_windows": "fasp_edge.pipeline.calibration",
    "export_bundle": "fasp_edge.export.bundle",
    "load_bundle": "fasp_edge.runtime.bundle",
    "load_model": "fasp_edge.checkpoints.loading",
    "load_pruned": "fasp_edge.checkpoints.pruned",
    "perplexity": "fasp_edge.pipeline.perplexity",
    "prune": "fasp_edge.pipeline.fasp",
    "save_pruned": "fasp_edge.checkpoints.pruned",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fasp_edge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["FaspError", "ModelFamilyNotSupported", "__version__", *sorted(_LAZY)]
