"""The ExecuTorch path of the export decoder: the static (custom-op) cache mode and its XNNPACK lowering."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasp_edge import load_model, prune
from fasp_edge.export.executorch import export_pte, runner_metadata
from fasp_edge.models.blocks import VALUE_PAD_MODES
from fasp_edge.models.decoder import ExportDecoder, run_decoder
from fasp_edge.runtime.executorch import PteModel
from fasp_edge.runtime.parity import check_export_parity

from .conftest import MODEL_BUILDERS, STORIES, random_windows, requires_shared

MAX_CONTEXT = 64
#: one XNNPACK partition per layer, plus the first layer's norm/QKV/RoPE (after the token lookup), the final
#: norm (after the last-token slice) and, with a tied embedding, the LM head on its own
EXTRA_PARTITIONS = 3
#: the only operators a LLaMA-like .pte may run outside XNNPACK: the token lookup, the input_pos[0] read,
#: the rope-table and last-token slices, the KV-cache write and the attention
ALLOWED_OUTSIDE = {"aten_embedding_default", "aten_select_copy_int", "aten_slice_copy_tensor",
                   "llama_update_cache", "llama_custom_sdpa_default"}


def _pruned(build):
    model = build()
    prune(model, sparsity=0.3, calibration=random_windows(), progress=False)
    return model


def _pte_vs_model(model: nn.Module, pte: PteModel, prefill: int = 12, steps: int = 6) -> float:
    """Max |Δlogits| of the .pte against the transformers model: a prefill, then teacher-forced single steps."""
    seq = random_windows(1, prefill + steps, vocab=model.config.vocab_size, seed=5)
    with torch.no_grad():
        ref = model(seq).logits[0]
    got = [pte.step(seq[:, :prefill], 0)] + [pte.step(seq[:, i:i + 1], i) for i in range(prefill, prefill + steps)]
    return max((g - r).abs().max().item() for g, r in zip(got, ref[prefill - 1:]))


def _export(model: nn.Module, path, **kw) -> tuple[ExportDecoder, dict]:
    decoder = ExportDecoder(model, max_context=MAX_CONTEXT, cache="static").eval()
    info = export_pte(decoder, path, runner_metadata(decoder, 2, [2]), **kw)
    return decoder, info


# ---------------------------------------------------------------- the static decoder in eager mode
@pytest.mark.slow
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "fasp"])
def test_static_decoder_matches_source_model(any_model, pruned):
    name, build = any_model
    model = _pruned(build) if pruned else build()
    prompt = random_windows(1, 24, seed=11)
    pads = VALUE_PAD_MODES if pruned else VALUE_PAD_MODES[:1]
    for pad in pads:
        decoder = ExportDecoder(model, max_context=MAX_CONTEXT, cache="static", full_logits=True, value_pad=pad)
        res = check_export_parity(model, decoder.eval(), prompt, 8)
        assert res["max_abs_diff"] < 1e-4, (name, pad, res)


@pytest.mark.slow
def test_one_stage_at_a_time_equals_the_whole_forward(any_model):
    """embed_window, run_block per block and head_logits (what block-by-block calibration runs) give the logits of
    forward(window, [0]) at every position."""
    name, build = any_model
    decoder = ExportDecoder(_pruned(build), max_context=MAX_CONTEXT, cache="static", full_logits=True).eval()
    window = random_windows(1, 20, seed=4)
    with torch.no_grad():
        ref = decoder(window, torch.tensor([0]))
        x = decoder.embed_window(window)
        for i in range(len(decoder.blocks)):
            x = decoder.run_block(i, x)
        got = decoder.head_logits(x)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5, name


def test_static_decoder_layout_and_reset():
    model = _pruned(MODEL_BUILDERS["llama-gqa"])
    decoder = ExportDecoder(model, max_context=MAX_CONTEXT, cache="static").eval()
    d = decoder.dims[0]
    assert d.v_head_dim < d.head_dim  # the manifest still reports the pruned value head
    assert decoder.k_cache_0.shape == decoder.v_cache_0.shape == (1, MAX_CONTEXT, d.num_kv_heads, d.head_dim)
    assert decoder.blocks[0].attn.v_proj is model.model.layers[0].self_attn.v_proj  # the model's own modules
    with torch.no_grad():
        decoder(random_windows(1, 5), torch.tensor([0]))
    assert decoder.v_cache_0.abs().sum() > 0
    decoder.reset_cache()
    assert all(getattr(decoder, f"{kv}_cache_{i}").abs().sum() == 0 for kv in "kv" for i in range(len(decoder.blocks)))


def test_eager_custom_ops_equal_the_plain_path():
    """The llama:: custom ops (run by the .pte) and the plain-PyTorch eager path compute the same thing."""
    model = _pruned(MODEL_BUILDERS["qwen2-bias"])
    seq = random_windows(1, 20, seed=2)
    plain = run_decoder(ExportDecoder(model, max_context=MAX_CONTEXT, cache="static", full_logits=True).eval(), seq, 12)
    decoder = ExportDecoder(model, max_context=MAX_CONTEXT, cache="static", full_logits=True).eval()
    decoder.eager_custom_ops = True
    ops = run_decoder(decoder, seq, 12)
    assert max((a - b).abs().max().item() for a, b in zip(plain, ops)) < 1e-5


def test_runner_metadata_says_custom_sdpa():
    decoder = ExportDecoder(MODEL_BUILDERS["llama-gqa"](), max_context=MAX_CONTEXT, cache="static")
    meta = runner_metadata(decoder, 2, [2])
    assert meta["use_sdpa_with_kv_cache"] is True and meta["use_kv_cache"] is True
    assert meta["get_max_context_len"] == MAX_CONTEXT and meta["get_n_layers"] == 2


# ---------------------------------------------------------------- lowering and the runtime
@pytest.fixture(scope="module")
def gqa_export(tmp_path_factory):
    model = MODEL_BUILDERS["llama-gqa"]()  # tied embedding / LM head, 4 query heads over 2 KV heads
    path = tmp_path_factory.mktemp("pte") / "gqa.pte"
    decoder, info = _export(model, path)
    return model, decoder, path, info


@pytest.mark.slow
def test_llama_pte_is_delegated_and_matches(gqa_export):
    model, decoder, path, info = gqa_export
    n = len(decoder.blocks)
    assert info["delegate_partitions"] <= n + EXTRA_PARTITIONS, info
    assert set(info["non_delegated_ops"]) <= ALLOWED_OUTSIDE, info["non_delegated_ops"]
    assert info["non_delegated_ops"]["llama_custom_sdpa_default"] == n
    assert info["non_delegated_ops"]["llama_update_cache"] == 2 * n
    assert info["lowering_seconds"] > 0 and info["files"] == {"gqa.pte": path.stat().st_size}
    pte = PteModel(path)
    assert pte.metadata("get_max_context_len") == MAX_CONTEXT and bool(pte.metadata("use_sdpa_with_kv_cache"))
    assert _pte_vs_model(model, pte) < 1e-4


@pytest.mark.slow
def test_pruned_llama_pte_matches(tmp_path):
    model = _pruned(MODEL_BUILDERS["mistral"])
    decoder, info = _export(model, tmp_path / "m.pte")
    assert decoder.dims[0].v_head_dim < decoder.dims[0].head_dim
    assert info["delegate_partitions"] <= len(decoder.blocks) + EXTRA_PARTITIONS, info
    assert set(info["non_delegated_ops"]) <= ALLOWED_OUTSIDE, info["non_delegated_ops"]
    assert _pte_vs_model(model, PteModel(tmp_path / "m.pte")) < 1e-4


@pytest.mark.slow
def test_pruned_opt_pte_matches(tmp_path):
    """OPT (LayerNorm, learned positions) is not fully delegated, but it exports and matches."""
    model = _pruned(MODEL_BUILDERS["opt-postln-proj"])
    _export(model, tmp_path / "o.pte")
    assert _pte_vs_model(model, PteModel(tmp_path / "o.pte")) < 1e-4


@pytest.mark.slow
@requires_shared(STORIES)
def test_stories260k_pte_is_delegated_and_matches(tmp_path):
    model = load_model(STORIES).model.eval()
    decoder, info = _export(model, tmp_path / "s.pte")
    n = len(decoder.blocks)
    assert info["delegate_partitions"] <= min(2 * n, n + EXTRA_PARTITIONS), info
    assert set(info["non_delegated_ops"]) <= ALLOWED_OUTSIDE, info["non_delegated_ops"]
    assert _pte_vs_model(model, PteModel(tmp_path / "s.pte"), prefill=32, steps=16) < 1e-4


@pytest.mark.slow
def test_tied_weights_stored_once_in_ptd(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128, head_dim=8,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()  # the tied table is 256 KiB
    table = model.lm_head.weight.numel() * 4
    _, inline = _export(model, tmp_path / "inline.pte")
    assert inline["files"]["inline.pte"] > 2 * table  # in the .pte: once as a constant, once in XNNPACK's data
    _, info = _export(model, tmp_path / "ext.pte", data_file="ext.ptd")
    assert info["files"]["ext.pte"] < 0.25 * table and table < info["files"]["ext.ptd"] < 1.3 * table, info["files"]
    assert _pte_vs_model(model, PteModel(tmp_path / "ext.pte", data_path=tmp_path / "ext.ptd")) < 1e-4


@pytest.mark.slow
def test_quantized_embedding_exports_and_runs(tmp_path):
    """A torchao int8 nn.Embedding becomes quantized_decomposed::embedding_byte (quant fusion pass)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    model = MODEL_BUILDERS["llama-gqa"]()
    decoder = ExportDecoder(model, max_context=MAX_CONTEXT, cache="static").eval()
    head = decoder.lm_head.weight.detach().clone()
    quantize_(decoder, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    assert type(decoder.lm_head.weight.data) is torch.Tensor and torch.equal(decoder.lm_head.weight, head)
    info = export_pte(decoder, tmp_path / "q.pte", runner_metadata(decoder, 2, [2]))
    assert "quantized_decomposed::embedding_byte.out" in info["runtime_operators"]
    assert "aten::embedding.out" not in info["runtime_operators"]
    pte = PteModel(tmp_path / "q.pte")
    seq = random_windows(1, 10, seed=4)
    with torch.no_grad():
        want = decoder(seq, torch.tensor([0]))[0]
    assert (pte.step(seq, 0) - want).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("build,quant", [("llama-gqa", "gptq"), ("opt", None), ("opt", "asymmetric")],
                         ids=["llama-8da4w-gptq", "opt-fp32", "opt-8da4w-asymmetric"])
def test_lean_lowering_lowers_what_executorchs_own_does(tmp_path, monkeypatch, build, quant):
    """export_pte runs 5 of XNNPACK's 17 preprocess passes, one decomposition pass instead of three and only the
    edge passes that have a node to rewrite: the same partitions, the same logits, the same files (XNNPACK's
    weights in the .ptd; one decomposition pass and gated edge passes: the same bytes), and ExecuTorch's own pass
    manager and edge-manager builder are back in place afterwards."""
    import contextlib
    import copy
    import hashlib
    import sys

    import executorch.backends.xnnpack.xnnpack_preprocess as preprocess
    from executorch.exir.program import _program

    from fasp_edge.export import executorch as et
    from fasp_edge.export.quantize import Recipe, quantize_decoder

    default, builder = preprocess.XNNPACKPassManager, _program._gen_edge_manager_for_partitioners
    edge_passes = _program._get_aten_to_edge_passes
    calls, decompose = [], _program.ExportedProgram.run_decompositions

    def counted(self, *args, **kwargs):  # only the edge-manager builder's passes (XNNPACK's own patterns call to_edge)
        if sys._getframe(1).f_code.co_name in ("_gen_edge_manager_for_partitioners", "one_pass"):
            calls.append(1)
        return decompose(self, *args, **kwargs)

    monkeypatch.setattr(_program.ExportedProgram, "run_decompositions", counted)
    model = _pruned(MODEL_BUILDERS[build])
    seq = random_windows(1, 10, seed=4)
    runs = {}
    for mode in ("lean", "one-pass", "full"):
        if mode == "one-pass":  # ExecuTorch's XNNPACK passes, our decomposition
            monkeypatch.setattr(et, "_lean_xnnpack_passes", contextlib.nullcontext)
        if mode == "full":
            monkeypatch.setattr(et, "_one_decomposition_pass", contextlib.nullcontext)
            monkeypatch.setattr(et, "_applicable_edge_passes", contextlib.nullcontext)
        # a copy each time, as export_bundle quantizes one: smoothing rescales the model's own norms and Linears
        decoder = ExportDecoder(copy.deepcopy(model), max_context=MAX_CONTEXT, cache="static").eval()
        if quant:
            quantize_decoder(decoder, Recipe(qparams=quant), calibration=random_windows(4, 16, seed=1))
        calls.clear()
        info = export_pte(decoder, tmp_path / f"{mode}.pte", runner_metadata(decoder, 2, [2]), data_file=f"{mode}.ptd")
        assert preprocess.XNNPACKPassManager is default and _program._gen_edge_manager_for_partitioners is builder
        assert _program._get_aten_to_edge_passes is edge_passes
        logits = PteModel(tmp_path / f"{mode}.pte", data_path=tmp_path / f"{mode}.ptd").step(seq, 0)
        digest = {f: hashlib.sha256((tmp_path / f"{mode}.{f}").read_bytes()).hexdigest() for f in ("pte", "ptd")}
        runs[mode] = (info, logits, digest, len(calls))
    (lean, lean_logits, _, lean_calls), (one, _, one_digest, one_calls), (full, full_logits, full_digest, full_calls) = \
        runs["lean"], runs["one-pass"], runs["full"]
    assert (lean_calls, one_calls, full_calls) == (1, 1, 3)
    assert one_digest == full_digest
    assert lean["delegate_partitions"] == full["delegate_partitions"]
    assert lean["non_delegated_ops"] == full["non_delegated_ops"]
    assert torch.equal(lean_logits, full_logits)
    assert lean["files"]["lean.ptd"] == full["files"]["full.ptd"]
    assert abs(lean["files"]["lean.pte"] - full["files"]["full.pte"]) < 4096, (lean["files"], full["files"])


class _EdgePassCases(nn.Module):
    def forward(self, x, i):
        same = x + x * x  # tensors of one dtype: nothing to rewrite
        scalar = x * 2.5  # a Python number for a Tensor argument
        mixed = x + i  # float + int64
        symbol = x * x.shape[1]  # a SymInt for a Tensor argument (dynamic dim)
        return same, scalar, mixed, symbol, x.t()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["same", "scalar", "mixed", "symbol", "t"])
def test_edge_pass_gates_skip_only_passes_that_change_nothing(case):
    """A gated ExecuTorch edge pass is skipped exactly where running it would leave the graph's operators as
    they are; where it would rewrite a node, it runs."""
    import copy

    from executorch.exir import passes as exir_passes
    from executorch.exir.passes.remove_mixed_type_operators import RemoveMixedTypeOperators

    from fasp_edge.export.executorch import _EDGE_PASS_TARGETS, _IfAnyNodeApplies

    index = ["same", "scalar", "mixed", "symbol", "t"].index(case)

    class One(nn.Module):
        def forward(self, x, i):
            return _EdgePassCases()(x, i)[index]

    x, i = torch.randn(3, 4), torch.arange(4)
    ep = torch.export.export(One(), (x, i), dynamic_shapes=({1: torch.export.Dim("d", min=2, max=64)}, {0: torch.export.Dim("d", min=2, max=64)}),
                             strict=False).run_decompositions({})
    classes = {"RemoveMixedTypeOperators": RemoveMixedTypeOperators,
               **{n: getattr(exir_passes, n) for n in _EDGE_PASS_TARGETS if n != "RemoveMixedTypeOperators"}}
    def ops(gm):  # each node's kind and target, and the kinds of a call's arguments (a constant becoming a tensor)
        return [(n.op, str(n.target) if n.op == "call_function" else "",
                 [type(a).__name__ for a in n.args] if n.op == "call_function" else []) for n in gm.graph.nodes]

    ran, gm = {}, copy.deepcopy(ep.graph_module)
    for name, applies in _EDGE_PASS_TARGETS.items():  # in the order the edge program runs them
        calls = []

        def edge_pass(graph, _p=classes[name]()):
            calls.append(1)
            return _p(graph)

        changed = ops(classes[name]()(copy.deepcopy(gm)).graph_module) != ops(gm)
        result = _IfAnyNodeApplies(edge_pass, applies)(gm)
        assert bool(calls) == changed, (case, name, ops(gm))
        if not calls:
            assert result.graph_module is gm and not result.modified
        ran[name], gm = bool(calls), result.graph_module
    expected = {"scalar": {"ScalarToTensorPass"}, "mixed": {"RemoveMixedTypeOperators"},
                "symbol": {"SymToTensorPass"}}.get(case)
    if expected is not None:
        assert expected <= {n for n, r in ran.items() if r}, ran
    if case == "same":
        assert not any(ran.values()), ran


@pytest.mark.slow
def test_one_decomposition_pass_falls_back_when_the_partitioner_declines_a_kept_op(tmp_path, monkeypatch):
    """If XNNPACK's filter rejects a node of an op it asks to keep undecomposed, ExecuTorch's own three-pass
    path builds the edge program (the one pass would leave that node undecomposed and undelegated)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.program import _program

    stock = _program._gen_edge_manager_for_partitioners
    used = []
    monkeypatch.setattr(_program, "_gen_edge_manager_for_partitioners",
                        lambda *a, **k: used.append("stock") or stock(*a, **k))
    real = XnnpackPartitioner.ops_to_not_decompose

    def declining(self, ep):
        ops, check = real(self, ep)
        return ops, (lambda node: False)

    monkeypatch.setattr(XnnpackPartitioner, "ops_to_not_decompose", declining)
    decoder = ExportDecoder(MODEL_BUILDERS["llama-gqa"](), max_context=MAX_CONTEXT, cache="static").eval()
    export_pte(decoder, tmp_path / "m.pte", runner_metadata(decoder, 2, [2]))
    assert used == ["stock"]
