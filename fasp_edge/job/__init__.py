"""The end-to-end job, ``fasp-edge run``: its TOML config (``run.toml`` is the documented default), its
stages and fingerprints, the orchestration of prune -> evaluate -> export -> bench, and its report.

The top of the library: it imports every layer below it; nothing in the package but the CLI imports it.
"""
