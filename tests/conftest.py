"""Shared fixtures: tiny random models of every family, and the real data in ../shared when present."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASP_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
STORIES = SHARED_DATA / "stories260K"
TINYSTORIES = SHARED_DATA / "tinystories" / "TinyStories-valid-sample.txt"
OPT_TOKENIZER = SHARED_DATA / "tokenizers" / "opt"
WIKI_VALID = SHARED_DATA / "wikitext2" / "wiki.valid.tokens"


def default_sigint() -> None:
    """A child process's ``preexec_fn``: SIGINT at its default (a shell that started the tests in the background,
    ``pytest &``, leaves it ignored, and children inherit that), so a test's Ctrl-C reaches it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def requires_shared(*paths: Path):
    missing = [str(p) for p in paths if not p.exists()]
    return pytest.mark.skipif(bool(missing), reason=f"shared test data absent: {', '.join(missing)}")


def _build(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # larger-than-default weights so that pruning visibly changes the output
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def tiny_opt(pre_ln: bool = True, proj: bool = False) -> torch.nn.Module:
    cfg = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                    max_position_embeddings=128, word_embed_proj_dim=24 if proj else 32,
                    do_layer_norm_before=pre_ln, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    cfg._attn_implementation = "eager"
    return _build(cfg)


def tiny_llama(kind: str = "llama") -> torch.nn.Module:
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=128, head_dim=8)
    if kind == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True)
    elif kind == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif kind == "qwen2":
        cfg = Qwen2Config(**common, use_sliding_window=False)  # q/k/v biases
    else:
        raise ValueError(kind)
    return _build(cfg)


MODEL_BUILDERS = {
    "opt": lambda: tiny_opt(),
    "opt-postln-proj": lambda: tiny_opt(pre_ln=False, proj=True),
    "llama-gqa": lambda: tiny_llama("llama"),
    "mistral": lambda: tiny_llama("mistral"),
    "qwen2-bias": lambda: tiny_llama("qwen2"),
}


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def any_model(request):
    return request.param, MODEL_BUILDERS[request.param]


def random_windows(n: int = 8, seqlen: int = 16, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seqlen), generator=g)


@pytest.fixture
def windows():
    return random_windows()


@pytest.fixture(scope="session")
def stories_bundles(tmp_path_factory):
    """stories260K dense and FASP-0.3 bundles (pte + onnx, 128 positions), shared by the export and bench tests.

    The pruned model is a checkpoint on disk (made by ``fasp-edge prune``), so its bundle names a PyTorch
    model that ``bench --backends torch`` can load. Maps name -> (bundle folder, loaded model).
    """
    if not (STORIES.exists() and TINYSTORIES.exists()):
        pytest.skip("shared stories260K data absent")
    from fasp_edge import export_bundle, load_model
    from fasp_edge.cli import main

    root = tmp_path_factory.mktemp("bundles")
    assert main(["-q", "prune", str(STORIES), "--sparsity", "0.3", "--calib-file", str(TINYSTORIES),
                 "--nsamples", "16", "--seqlen", "128", "-o", str(root / "fasp-checkpoint")]) == 0
    out = {}
    for name, src in (("dense", STORIES), ("fasp", root / "fasp-checkpoint")):
        loaded = load_model(str(src))
        export_bundle(loaded, root / name, formats=["pte", "onnx"], max_context=128, progress=False)
        out[name] = (root / name, loaded)
    return out
