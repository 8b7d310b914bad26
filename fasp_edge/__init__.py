"""fasp-edge: FASP structured pruning and on-device export of causal language models."""

import logging as _logging

# Known import-time noise of pinned dependencies, not actionable by a user: torchao (pulled in by
# transformers' quantizer registry) reports its optional CUDA kernels missing on CPU machines, and
# torch warns about torchao's Enum pytree registrations.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from .errors import FaspError, ModelFamilyNotSupported
from .export.bundle import export_bundle, load_bundle
from .models.loading import load_model
from .pipeline import calibration_windows, load_pruned, perplexity, prune, save_pruned

__version__ = "0.1.0"

__all__ = ["FaspError", "ModelFamilyNotSupported", "__version__", "calibration_windows", "export_bundle",
           "load_bundle", "load_model", "load_pruned", "perplexity", "prune", "save_pruned"]
