"""Checkpoints: load a causal LM (a Hugging Face folder, a hub id, a GGUF file, the embedded default) and
save or load a pruned one (smaller dense tensors plus the per-layer shapes in ``config.json``)."""
