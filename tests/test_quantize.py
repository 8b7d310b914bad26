"""The 4-bit recipe: asymmetric groups on XNNPACK's symmetric kernel, the recipe's choices, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasp_edge.errors import InvalidArgument
from fasp_edge.export.decoder import ExportDecoder
from fasp_edge.export.quantize import Recipe, asymmetric_4bit, linear_schemes, quantize_decoder, to_group_offset

from .conftest import MODEL_BUILDERS, random_windows


def _q4_1_weight(out: int = 16, k: int = 64, seed: int = 0) -> torch.Tensor:
    """A weight on a GGUF-Q4_1-like grid: per group of 32, ``m + d·q`` with ``q`` in 0..15 using both ends."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, k // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(out, k // 32, 1, generator=g) * 0.05 + 0.01).to(torch.bfloat16).float()
    m = torch.randn(out, k // 32, 1, generator=g) * 0.1
    return (m + d * q).reshape(out, k)


def test_asymmetric_4bit_reproduces_a_q4_1_grid():
    w = _q4_1_weight()
    q, d, c = asymmetric_4bit(w)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    back = (q.float().reshape(16, 2, 32) * d[..., None] + c[..., None]).reshape_as(w)
    assert (back - w).abs().max() < 1e-5


def test_group_offset_linear_beats_symmetric_4bit():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(_q4_1_weight())
    x = torch.randn(5, 64)
    ref = lin(x)
    asym = to_group_offset(lin)
    sym = nn.Sequential(nn.Linear(64, 16))
    sym[0].load_state_dict(lin.state_dict())
    quantize_(sym, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    with torch.no_grad():
        err_asym = (asym(x) - ref).abs().max().item()
        err_sym = (sym(x) - ref).abs().max().item()
    assert err_asym < 0.05 * ref.abs().max().item()  # only the 8-bit activations remain
    assert err_asym < err_sym / 3


def test_quantize_decoder_follows_the_recipe():
    model = MODEL_BUILDERS["llama-gqa"]()  # hidden 32 (4-bit groups fit), FFN 48 (they do not)
    decoder = ExportDecoder(model, max_context=64, cache="static", full_logits=True).eval()
    schemes = linear_schemes(decoder, Recipe())
    assert schemes["lm_head"] == "8da8w-per-channel"
    assert all(v == "8da8w-per-channel" for k, v in schemes.items() if k.endswith("down_proj"))
    prompt = random_windows(1, 12, seed=3)
    with torch.no_grad():
        decoder.reset_cache()
        ref = decoder(prompt, torch.tensor([0]))
    info = quantize_decoder(decoder, Recipe(embedding="4bit"))
    assert info["embedding"] == "int4-g32-asymmetric" and info["lm_head"] == "8da8w-per-channel"
    assert info["linear_counts"]["8da4w-g32"] == 2 * 6 and info["recipe"]["qparams"] == "asymmetric"
    assert any(k.endswith("down_proj") for k in info["fallback_8bit"])
    assert type(decoder.embed_tokens.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert quantize_decoder(ExportDecoder(MODEL_BUILDERS["llama-gqa"](), max_context=64).eval())["embedding"] == "float32"
    with torch.no_grad():
        decoder.reset_cache()
        got = decoder(prompt, torch.tensor([0]))
    assert torch.isfinite(got).all() and got.shape == ref.shape  # closeness: see the stories260K export test


@pytest.mark.parametrize("field,value,needle", [("qparams", "nf4", "qparams"), ("lm_head", "2bit", "LM head"),
                                                ("embedding", "fp8", "embedding")])
def test_recipe_rejects_unknown_choices(field, value, needle):
    with pytest.raises(InvalidArgument, match=needle):
        Recipe(**{field: value}).check()


def test_cli_refuses_recipe_flags_without_8da4w(tmp_path, capsys):
    from fasp_edge.cli import main

    assert main(["export", "--formats", "pte", "--lm-head", "4bit", "-o", str(tmp_path / "b")]) == 2
    assert "apply to --quant 8da4w only" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
