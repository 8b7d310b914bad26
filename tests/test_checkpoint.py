"""Pruned checkpoints: save/load round trip, the fasp section, plain-transformers loading when standard."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fasp_edge import load_model, load_pruned, prune
from fasp_edge.checkpoints.pruned import fasp_section, save_pruned
from fasp_edge.errors import ModelLoadError

from .conftest import MODEL_BUILDERS, OPT_TOKENIZER, random_windows, requires_shared


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_round_trip_gives_identical_logits(tmp_path, name):
    model = MODEL_BUILDERS[name]()
    windows = random_windows()
    prune(model, sparsity=0.3, calibration=windows, progress=False)
    section = fasp_section(model, method="fasp", sparsity=0.3, extra={"source_model": {"sha256": "x"}})
    save_pruned(model, None, tmp_path / "ckpt", section)
    loaded = load_pruned(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, windows), _logits(model, windows))
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["fasp"]
    assert saved["ffn_dims"] == section["ffn_dims"] and saved["v_head_dims"] == section["v_head_dims"]
    assert saved["standard_architecture"] is False
    # the in-memory config is left as it was
    assert not hasattr(model.config, "fasp")


def test_mlp_only_checkpoint_loads_with_plain_transformers(tmp_path):
    model = MODEL_BUILDERS["llama-gqa"]()
    windows = random_windows()
    prune(model, sparsity=0.25, targets=["mlp"], calibration=windows, progress=False)
    section = fasp_section(model, method="fasp", sparsity=0.25)
    assert section["standard_architecture"] is True
    save_pruned(model, None, tmp_path / "ckpt", section)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert plain.config.intermediate_size == 36
    assert torch.equal(_logits(plain, windows), _logits(model, windows))


@requires_shared(OPT_TOKENIZER)
def test_load_model_recognises_pruned_checkpoint(tmp_path):
    from transformers import AutoTokenizer

    model = MODEL_BUILDERS["opt"]()
    prune(model, sparsity=0.5, method="magnitude", progress=False)
    tok = AutoTokenizer.from_pretrained(OPT_TOKENIZER)
    save_pruned(model, None, tmp_path / "bare", fasp_section(model, method="magnitude", sparsity=0.5))
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(tmp_path / "bare")
    save_pruned(model, tok, tmp_path / "ckpt", fasp_section(model, method="magnitude", sparsity=0.5))
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.tokenizer("Hello world").input_ids == [2, 31414, 232]
    ids = random_windows()
    assert torch.equal(_logits(loaded.model, ids), _logits(model, ids))


def test_not_a_pruned_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a fasp-edge pruned checkpoint"):
        load_pruned(tmp_path)


def test_existing_output_is_refused_and_kept(tmp_path):
    model = MODEL_BUILDERS["opt"]()
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    from fasp_edge.errors import OutputExists

    with pytest.raises(OutputExists, match="--overwrite"):
        save_pruned(model, None, out, fasp_section(model, method="fasp", sparsity=0.0))
    assert (out / "keep.txt").read_text() == "mine"
    save_pruned(model, None, out, fasp_section(model, method="fasp", sparsity=0.0), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left





def test_a_checkpoint_is_one_file_and_a_sharded_one_still_loads(tmp_path):
    """save_pruned writes one model.safetensors whatever the size (transformers shards from 5 GB, which a pruned
    1.5B model passes); a checkpoint written sharded before that loads from its index."""
    from safetensors.torch import load_file, save_file

    model = MODEL_BUILDERS["qwen2-bias"]()
    windows = random_windows()
    prune(model, sparsity=0.3, calibration=windows, progress=False)
    section = fasp_section(model, method="fasp", sparsity=0.3, extra={"source_model": {"sha256": "x"}})
    save_pruned(model, None, tmp_path / "ckpt", section)
    folder = tmp_path / "ckpt"
    assert (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").exists()
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    (folder / "model.safetensors").unlink()
    assert torch.equal(_logits(load_pruned(folder), windows), _logits(model, windows))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="incomplete"):
        load_pruned(folder)
