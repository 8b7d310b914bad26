"""Calibration, FASP and baselines, perplexity, pruned checkpoints."""

from .calibration import Calibration, calibration_windows
from .checkpoint import load_pruned, save_pruned
from .fasp import METHODS, PruneResult, prune
from .perplexity import perplexity

__all__ = ["Calibration", "METHODS", "PruneResult", "calibration_windows", "load_pruned", "perplexity", "prune",
           "save_pruned"]
