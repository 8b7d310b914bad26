"""The pruning library's choices and defaults. Standard library only: the CLI builds its options and help from
them (and checks them) without loading torch or transformers."""

from __future__ import annotations

METHODS = ("magnitude", "wanda-sp", "fasp")
TARGETS = ("mlp", "attn")
REFIT_PRIORS = ("zero", "original")
SELECTIONS = ("auto", "score", "obs")  # auto: obs for fasp (the refit it ranks by), score for the others
ALLOCATION_RULES = ("error", "standardized", "energy", "uniform")  # --param-reduction's rules (:mod:`.allocation`)
# the refit's defaults (fasp.py's docstring, step 3): λ per pair on held-out windows, damped toward the kept weights,
# OBS for fasp; measured better than the earlier damp=0.01, refit_prior="zero", selection="score" (README)
DEFAULT_DAMP = "auto"
DEFAULT_REFIT_PRIOR = "original"
DEFAULT_SELECTION = "auto"
DEFAULT_ALLOCATION = "error"  # --param-reduction's rule, chosen on held-out text
