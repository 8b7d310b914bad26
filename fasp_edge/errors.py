"""User-facing errors. Each message says what went wrong and what to do about it.

The CLI prints a :class:`FaspError` as one line (``error: ...``) and exits non-zero, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FaspError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class ModelFamilyNotSupported(FaspError):
    """The model's architecture has no family descriptor."""


class InvalidArgument(FaspError):
    """An option has a value outside its allowed range."""


class ModelLoadError(FaspError):
    """A model, tokenizer or checkpoint could not be loaded safely."""


class NonFiniteWeights(ModelLoadError):
    """The model's weights hold NaN or Inf values."""


class CalibrationError(FaspError):
    """Calibration data could not be produced as requested."""


class OutputExists(FaspError):
    """The output folder exists and is not empty."""
