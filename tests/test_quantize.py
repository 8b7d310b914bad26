"""The 4-bit recipes: calibrated symmetric groups (smoothing + GPTQ, the default), asymmetric groups on XNNPACK's
symmetric kernel, the recipe's choices, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fasp_edge.errors import InvalidArgument
from fasp_edge.models.decoder import ExportDecoder
from fasp_edge.export.quantize import (CALIBRATED_RECIPE, GroupSum, QuantizedEmbedding, Recipe, asymmetric_4bit,
                                      gptq_4bit, input_grams, linear_schemes, quantize_decoder, smooth,
                                      smoothing_pairs, to_group_offset)

from .conftest import MODEL_BUILDERS, random_windows

ASYM = Recipe(qparams="asymmetric")
CALIB = random_windows(4, 16, seed=1)


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
    info = quantize_decoder(decoder, Recipe(qparams="asymmetric", embedding="4bit"))
    assert info["embedding"] == "int4-g32-asymmetric" and info["lm_head"] == "8da8w-per-channel"
    assert info["linear_counts"]["8da4w-g32"] == 2 * 6 and info["recipe"]["qparams"] == "asymmetric"
    assert any(k.endswith("down_proj") for k in info["fallback_8bit"])
    assert isinstance(decoder.embed_tokens, QuantizedEmbedding) and decoder.embed_tokens.bits == 4
    # the default: a tied table takes the 8-bit head's own integer tensor (stored once in model.ptd)
    tied = ExportDecoder(MODEL_BUILDERS["llama-gqa"](), max_context=64).eval()
    assert quantize_decoder(tied, calibration=CALIB)["embedding"] == "int8-per-row, shared with the LM head"
    assert tied.embed_tokens.weight is tied.lm_head.weight_int
    untied = ExportDecoder(MODEL_BUILDERS["mistral"](), max_context=64).eval()
    assert quantize_decoder(untied, ASYM)["embedding"] == "int8-per-row"
    assert quantize_decoder(ExportDecoder(MODEL_BUILDERS["opt"](), max_context=64).eval(),
                            Recipe(qparams="asymmetric", embedding="none"))["embedding"] == "float32"
    with torch.no_grad():
        decoder.reset_cache()
        got = decoder(prompt, torch.tensor([0]))
    assert torch.isfinite(got).all() and got.shape == ref.shape  # closeness: see the stories260K export test


def test_siblings_share_one_group_sum_exactly():
    """q/k/v and gate/up compute their group sums once (one exported Linear, not three), with the same logits."""
    from fasp_edge.export.executorch import _Forward

    decoder = ExportDecoder(MODEL_BUILDERS["llama-gqa"](), max_context=64, cache="static").eval()
    quantize_decoder(decoder, ASYM)
    blk = decoder.blocks[0]
    assert blk.attn.q_proj.group_sum is blk.attn.k_proj.group_sum is blk.attn.v_proj.group_sum
    assert blk.gate_proj.group_sum is blk.up_proj.group_sum
    assert blk.attn.o_proj.group_sum is not blk.attn.q_proj.group_sum
    apart = copy.deepcopy(decoder)
    for mod in apart.modules():  # the same Linears, each with a group sum of its own
        if hasattr(mod, "group_sum"):
            mod.group_sum = GroupSum(mod.main.in_features)
    prompt = random_windows(1, 9, seed=4)
    outs = []
    with torch.no_grad():
        for d in (decoder, apart):
            d.reset_cache()
            outs.append(torch.cat([d(prompt, torch.tensor([0])), d(prompt[:, :1], torch.tensor([9]))]))
    assert torch.equal(outs[0], outs[1])

    def group_sum_nodes(d):
        ep = torch.export.export(_Forward(d), (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0])), strict=False)
        sums = {n.name for n in ep.graph.nodes if n.op == "placeholder" and "group_sum" in n.name}
        return sum(1 for n in ep.graph.nodes if n.op == "call_function" and any(a.name in sums for a in n.args
                                                                                if hasattr(a, "name")))

    n = len(decoder.blocks)
    # 4-bit per layer: q, k, v, o, gate, up (down's 48 inputs fall back to 8-bit), reading 3 tensors
    assert group_sum_nodes(decoder) == 3 * n and group_sum_nodes(apart) == 6 * n


@pytest.mark.parametrize("field,value,needle", [("qparams", "nf4", "qparams"), ("lm_head", "2bit", "LM head"),
                                                ("embedding", "fp8", "embedding")])
def test_recipe_rejects_unknown_choices(field, value, needle):
    with pytest.raises(InvalidArgument, match=needle):
        Recipe(**{field: value}).check()


def test_cli_refuses_recipe_flags_without_8da4w(tmp_path, capsys):
    from fasp_edge.cli import main

    assert main(["export", "--formats", "pte", "--lm-head", "4bit", "-o", str(tmp_path / "b")]) == 2
    assert "apply to --quant 8da4w (and all but --embedding-quant to 4bit) only" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(["export", "--formats", "pte", "--keep-8bit", "down_proj", "-o", str(tmp_path / "b")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embedding_matches_its_runtime_kernel(bits):
    """Eager rows are the dequantized table; ExecuTorch's embedding_byte / embedding_4bit kernel computes the same."""
    from executorch.exir import to_edge
    from executorch.runtime import Runtime

    from fasp_edge.runtime.executorch import load_runtime_ops

    load_runtime_ops()
    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    emb = QuantizedEmbedding.int8_per_row(w) if bits == 8 else QuantizedEmbedding.asymmetric_4bit(w)
    idx = torch.tensor([[0, 7, 49, 7]])
    rows = emb(idx)
    step = (w.abs().amax(1) / 127) if bits == 8 else None
    if bits == 8:
        assert ((rows - w[idx]).abs() <= step[idx].unsqueeze(-1) / 2 + 1e-7).all()  # half a step per row
    else:
        q, d, c = asymmetric_4bit(w)
        assert torch.allclose(rows, (d.repeat_interleave(32, 1) * q.float() + c.repeat_interleave(32, 1))[idx], atol=1e-6)
    program = to_edge(torch.export.export(emb, (idx,))).to_executorch()
    method = Runtime.get().load_program(program.buffer).load_method("forward")
    assert torch.equal(method.execute([idx])[0], rows)


@pytest.mark.slow
def test_tied_8bit_table_is_stored_once_in_the_ptd(tmp_path):
    """The 8-bit LM head and the 8-bit embedding read one integer table: model.ptd holds it once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fasp_edge.export.executorch import export_pte, runner_metadata
    from fasp_edge.runtime.executorch import PteModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    decoder = ExportDecoder(LlamaForCausalLM(cfg).eval(), max_context=32, cache="static").eval()
    calib = torch.randint(3, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    assert quantize_decoder(decoder, calibration=calib)["embedding"] == "int8-per-row, shared with the LM head"
    tokens = torch.tensor([[5, 8000, 17]])
    with torch.no_grad():
        decoder.reset_cache()
        ref = decoder(tokens, torch.tensor([0]))
    info = export_pte(decoder, tmp_path / "model.pte", runner_metadata(decoder, 1, [2]), data_file="model.ptd")
    table = 8192 * 64
    assert table < info["files"]["model.ptd"] < 1.5 * table, info["files"]  # twice would be > 2x
    assert info["files"]["model.pte"] < table / 2
    assert "quantized_decomposed::embedding_byte.out" in info["runtime_operators"]
    assert info["non_delegated_ops"].get("quantized_decomposed_embedding_byte_default") == 1
    got = PteModel(tmp_path / "model.pte", data_path=tmp_path / "model.ptd").step(tokens, 0)
    assert got.argmax().item() == ref.argmax().item() and (got - ref).abs().max() < 0.05 * ref.abs().max()


# ---------------------------------------------------------------------------------------------- calibrated (gptq)
def _logits(decoder, tokens):
    with torch.no_grad():
        decoder.reset_cache()
        return decoder(tokens, torch.tensor([0]))


@pytest.mark.parametrize("build", ["llama-gqa", "opt"])
def test_smoothing_keeps_the_fp32_function_and_finds_an_outlier_channel(build):
    """Smoothing only moves scale between a norm (or a producer Linear) and the Linears it feeds: the fp32 logits
    stay; the Gram matrices it updates are those of the smoothed model's inputs; an input channel made 30x larger
    than the rest (the function unchanged) is smoothed."""
    model = MODEL_BUILDERS[build]()
    decoder = ExportDecoder(model, max_context=64, cache="static", full_logits=True).eval()
    blk = decoder.blocks[0]
    norm = getattr(blk, "input_layernorm", None) or blk.self_attn_layer_norm
    with torch.no_grad():  # an outlier input channel of q/k/v, the same function
        norm.weight[3] *= 30
        if getattr(norm, "bias", None) is not None:
            norm.bias[3] *= 30
        for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj):
            lin.weight[:, 3] /= 30
    tokens = random_windows(1, 12, seed=3)
    ref = _logits(decoder, tokens)
    lins = {n: m for n, m in decoder.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}
    named = input_grams(lambda w: _logits(decoder, w[None]), CALIB, lins)
    grams = {id(lins[n]): g for n, g in named.items()}
    assert grams[id(blk.attn.q_proj)] is grams[id(blk.attn.v_proj)]  # siblings share one matrix
    exponents = smooth(smoothing_pairs(decoder), grams)
    assert exponents[0] > 0  # the first pair: that norm and q/k/v
    assert (_logits(decoder, tokens) - ref).abs().max() < 1e-4
    fresh = input_grams(lambda w: _logits(decoder, w[None]), CALIB, lins)
    for n, lin in lins.items():
        assert torch.allclose(grams[id(lin)], fresh[n], rtol=1e-4, atol=1e-6 * fresh[n].abs().max().item()), n


def test_scale_search_in_blocks_equals_one_factor_at_a_time(monkeypatch):
    """searched_scales tries every factor on a block of rows at once; the scales are those of trying each factor
    over the whole weight in turn (the first factor wins a tie), for any block size."""
    import fasp_edge.export.quantize as quantize

    g = torch.randn(70, 3, 32, generator=torch.Generator().manual_seed(0))
    g[0, 0] = 0.0  # an all-zero group
    weight = torch.rand(3, 32, generator=torch.Generator().manual_seed(1))
    base = g.abs().amax(-1) / 8
    best = bd = None
    for f in quantize.SCALE_FACTORS:
        d = quantize._bf16(base * f)
        err = ((quantize._on_grid(g, d) - g) ** 2 * weight).sum(-1)
        better = err if best is None else err < best
        best, bd = (err, d) if best is None else (torch.where(better, err, best), torch.where(better, d, bd))
    for block in (1, 5000, 1 << 17):
        monkeypatch.setattr(quantize, "_SEARCH_BLOCK", block)
        assert torch.equal(quantize.searched_scales(g, weight), bd), block


def test_gptq_4bit_is_on_the_kernels_grid_and_beats_rounding():
    """GPTQ's integers lie in -8..7 with bf16 scales, and its output error on correlated inputs is below that of
    rounding each group on its own (max/8 scales) and of rounding with the searched scales."""
    from fasp_edge.export.quantize import _on_grid, searched_scales

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 96, generator=g)
    x = torch.randn(400, 96, generator=g) @ (torch.eye(96) + 0.4 * torch.randn(96, 96, generator=g))
    gram = (x.T @ x).double()
    q, d = gptq_4bit(w, gram)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7 and d.shape == (24, 3)
    assert torch.equal(d, d.to(torch.bfloat16).float())
    back = (q.float().reshape(24, 3, 32) * d[..., None]).reshape_as(w)
    groups = w.reshape(24, 3, 32)
    plain = _on_grid(groups, (groups.abs().amax(-1) / 8).to(torch.bfloat16).float()).reshape_as(w)
    searched = _on_grid(groups, searched_scales(groups, (x ** 2).mean(0).reshape(3, 32))).reshape_as(w)

    def err(wq):
        return float(((x @ (wq - w).T) ** 2).sum())

    assert err(back) < 0.8 * err(searched) < 0.8 * err(plain), (err(back), err(searched), err(plain))


@pytest.mark.parametrize("build", ["llama-gqa", "opt"])
def test_calibration_goes_block_by_block(build, monkeypatch):
    """Each block's Linears are fitted to the inputs the blocks before it, already quantized, hand it: the Gram
    matrix GPTQ gets for a Linear of the second block equals the one measured afterwards on the quantized model
    (its own smoothing included), which statistics of the fp32 model would not."""
    import fasp_edge.export.quantize as quantize

    decoder = ExportDecoder(MODEL_BUILDERS[build](), max_context=64, cache="static", full_logits=True).eval()
    q_proj = decoder.blocks[1].attn.q_proj
    seen = {}
    real = quantize.gptq_4bit

    def recording(w, gram, *args):
        seen[id(w)] = gram
        return real(w, gram, *args)

    monkeypatch.setattr(quantize, "gptq_4bit", recording)
    info = quantize_decoder(decoder, CALIBRATED_RECIPE, calibration=CALIB)
    assert info["calibration"]["order"] == "block by block"
    got = seen[id(q_proj.weight)]
    after = input_grams(lambda w: _logits(decoder, w[None]), CALIB, {"q": decoder.blocks[1].attn.q_proj})["q"]
    assert torch.allclose(got, after, rtol=1e-4, atol=1e-6 * after.abs().max().item())


def test_statistics_pass_stops_once_every_input_is_recorded():
    """input_grams stops each call once every Linear asked for has its input: a block's q/o/gate/up statistics
    leave gate, up and down unrun, and equal those of a whole forward pass."""
    decoder = ExportDecoder(MODEL_BUILDERS["llama-gqa"](), max_context=64, cache="static", full_logits=True).eval()
    blk = decoder.blocks[0]
    names = {"blocks.0.attn.q_proj": blk.attn.q_proj, "blocks.0.attn.o_proj": blk.attn.o_proj,
             "blocks.0.gate_proj": blk.gate_proj, "blocks.0.up_proj": blk.up_proj}
    hidden = [decoder.embed_window(w[None]) for w in CALIB]
    ran = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, m in
             (("gate", blk.gate_proj), ("up", blk.up_proj), ("down", blk.down_proj))]
    early = input_grams(lambda x: decoder.run_block(0, x), hidden, names)
    for h in hooks:
        h.remove()
    assert ran == [] and early["blocks.0.gate_proj"] is early["blocks.0.up_proj"]
    full = {}
    for n, m in names.items():  # one Linear at a time: nothing to stop early for until its own input
        full.update(input_grams(lambda x: decoder.run_block(0, x), hidden, {n: m}))
    for n in names:
        assert torch.equal(early[n], full[n]), n


def test_gptq_recipe_calibrates_and_needs_windows():
    decoder = ExportDecoder(MODEL_BUILDERS["llama-gqa"](), max_context=64, cache="static", full_logits=True).eval()
    tokens = random_windows(1, 12, seed=3)
    ref = _logits(decoder, tokens)
    with pytest.raises(InvalidArgument, match="calib"):
        quantize_decoder(copy.deepcopy(decoder), CALIBRATED_RECIPE)
    info = quantize_decoder(decoder, CALIBRATED_RECIPE, calibration=CALIB)
    assert info["recipe"]["qparams"] == "gptq" and info["calibration"]["windows"] == 4
    assert info["calibration"]["pairs"] > 0 and info["linear_counts"]["8da4w-g32"] == 2 * 4  # q, o, gate, up (k, v, down: 8-bit)
    got = _logits(decoder, tokens)
    # a random tiny model rounded to 4 bits: close in the mean (relative squared error), not an exact match
    assert torch.isfinite(got).all() and ((got - ref) ** 2).mean() < 0.1 * (ref ** 2).mean()


def test_cli_refuses_calib_text_without_8da4w(tmp_path, capsys):
    from fasp_edge.cli import main

    assert main(["export", "--formats", "pte", "--calib-text", "x.txt", "-o", str(tmp_path / "b")]) == 2
    assert "--calib-text and --calib-windows apply to --quant 8da4w and 4bit only" in capsys.readouterr().err


def test_cli_refuses_calib_text_for_a_grid_that_does_not_calibrate(tmp_path, capsys):
    from fasp_edge.cli import main

    assert main(["export", "--formats", "pte", "--quant", "8da4w", "--qparams", "asymmetric", "--calib-text", "x.txt",
                 "-o", str(tmp_path / "b")]) == 2
    assert "--qparams asymmetric does not calibrate" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_each_grid_keeps_its_own_8bit_linears():
    """The default is the calibrated grid with its three 8-bit Linear kinds; another grid, asked for without
    --keep-8bit, keeps none (asymmetric groups are exact enough for all)."""
    from fasp_edge.export.quantize import DEFAULT_RECIPE

    assert DEFAULT_RECIPE == Recipe() and DEFAULT_RECIPE.calibrated
    assert Recipe().keep_8bit == ["down_proj", "v_proj", "k_proj"]
    assert Recipe(qparams="asymmetric").keep_8bit == [] and not Recipe(qparams="asymmetric").calibrated
    assert Recipe(qparams="gptq", keep_8bit=["down_proj"]).keep_8bit == ["down_proj"]


# ---------------------------------------------------------------- ONNX Runtime's blocks (--quant 4bit)
def test_blocks_pad_widths_that_are_not_whole_blocks_and_gptq_beats_rounding():
    """Asymmetric blocks of 32 on a 40-wide input: padded to 64, the padding dequantizes to 0, every integer is on
    the grid; on the calibration inputs GPTQ's output error is below round-to-nearest's."""
    from fasp_edge.export.quantize import BlockQuantLinear

    torch.manual_seed(0)
    lin = nn.Linear(40, 24, bias=False)
    x = torch.randn(256, 40) * torch.linspace(0.2, 3.0, 40)  # uneven input scales, as activations have
    gram = (x.T @ x).double()
    errors = {}
    for kind in ("minmax", "gptq"):
        for bits in (4, 8):
            q = BlockQuantLinear.minmax(lin, bits) if kind == "minmax" else BlockQuantLinear.gptq(lin, gram, bits)
            assert q.q.shape == (24, 64) and q.scales.shape == (24, 2) and q.zero_points.shape == (24, 2)
            assert int(q.q.max()) <= 2**bits - 1 and int(q.zero_points.max()) <= 2**bits - 1
            full = (q.q.float() - q.zero_points.float().repeat_interleave(32, 1)) * q.scales.repeat_interleave(32, 1)
            assert full[:, 40:].abs().max() == 0 and q.dequantized().shape == (24, 40)
            errors[kind, bits] = float(((x @ (q.dequantized() - lin.weight.detach()).T) ** 2).mean())
    assert errors["gptq", 4] < errors["minmax", 4]
    assert errors["minmax", 8] < errors["minmax", 4] / 100  # 8-bit blocks: ~1/256 of the step, squared


def test_matmul_nbits_packing_is_what_onnx_runtime_reads():
    """The packed B / scales / zero points (4 and 8 bits, an odd number of blocks) in a one-node graph: ONNX
    Runtime's MatMulNBits with fp32 compute gives x @ dequantized.T; GatherBlockQuantized on the same B gives its
    rows."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from fasp_edge.export.onnx import _gather_blocks, _pack_blocks
    from fasp_edge.export.quantize import BlockQuantLinear

    torch.manual_seed(0)
    lin = nn.Linear(96, 20, bias=False)  # 3 blocks: the zero points' last byte holds one
    x = torch.randn(1, 3, 96)
    for bits in (4, 8):
        q = BlockQuantLinear.minmax(lin, bits)
        b, s, z = _pack_blocks(q)
        extra: list = []
        gather = _gather_blocks(helper.make_node("Gather", ["B", "ids"], ["rows"], name="g"), q, ["B", "S", "Z"], extra)
        mm = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=96, N=20,
                              bits=bits, block_size=32, accuracy_level=0)
        graph = helper.make_graph(
            [mm, *gather], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 96]),
                                 helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
             helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S"), numpy_helper.from_array(z, "Z"), *extra])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y, rows = sess.run(None, {"x": x.numpy(), "ids": np.array([[3, 17]])})
        w = q.dequantized()
        assert np.abs(y - (x @ w.T).numpy()).max() < 1e-4
        assert rows.shape == (1, 2, 96) and np.abs(rows[0] - w[[3, 17]].numpy()).max() == 0


def test_block_recipe_refuses_unknown_choices():
    from fasp_edge.export.quantize import BlockRecipe

    for bad, needle in (({"qparams": "hqq"}, "qparams"), ({"lm_head": "2bit"}, "LM head"),
                        ({"accuracy_level": 7}, "accuracy level"), ({"block_size": 24}, "power of two")):
        with pytest.raises(InvalidArgument, match=needle):
            BlockRecipe(**bad).check()
