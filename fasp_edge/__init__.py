"""fasp-edge: FASP structured pruning and on-device export of causal language models."""

from .errors import FaspError, ModelFamilyNotSupported
from .models.loading import load_model
from .pipeline import calibration_windows, load_pruned, perplexity, prune, save_pruned

__version__ = "0.1.0"

__all__ = ["FaspError", "ModelFamilyNotSupported", "__version__", "calibration_windows", "load_model", "load_pruned",
           "perplexity", "prune", "save_pruned"]
