"""The pruning library: calibration, input statistics, channel scoring and refits, FASP and its baselines,
the parameter-budget allocation, and the evaluation of a model (perplexity, agreement, zero-shot tasks).

It reads models through :mod:`fasp_edge.models` and :mod:`fasp_edge.checkpoints` and imports nothing above
them (export, runtime, bench, job). The public entry points are re-exported lazily from :mod:`fasp_edge`.
"""
