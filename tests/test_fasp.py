"""The FASP method: tests that fail if the structure, the metric or the restoration were wrong."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fasp_edge import prune
from fasp_edge.models import family_for
from fasp_edge.models.base import AttentionLayout
from fasp_edge.errors import InvalidArgument
from fasp_edge.pipeline.channels import (DAMP_GRID, attention_columns, choose_damp, keep_count, obs_curve, obs_select,
                                         refit_error, restore_columns, score_channels, top_channels, value_channel_scores)
from fasp_edge.pipeline.stats import InputStatistics

from .conftest import MODEL_BUILDERS, random_windows


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "fasp"])
def test_sparsity_zero_leaves_logits_unchanged(any_model, windows, method):
    _, build = any_model
    model = build()
    before = logits(model, windows[:2])
    prune(model, sparsity=0.0, method=method, calibration=windows, progress=False)
    assert torch.allclose(logits(model, windows[:2]), before, atol=1e-5, rtol=0)


def _masked_dense(build, result):
    """The dense model with the pruned channels' W2 columns set to zero."""
    dense = build()
    family = family_for(dense)
    with torch.no_grad():
        for layer, decision in zip(family.layers(dense), result.decisions):
            w2 = family.mlp_out(layer)
            drop = torch.ones(w2.in_features, dtype=torch.bool)
            drop[decision.mlp_keep] = False
            w2.weight[:, drop] = 0
            lay = family.attention_layout(layer)
            _, o_cols = attention_columns(decision.attn_keep, lay)
            o = family.attn_out(layer)
            drop = torch.ones(o.in_features, dtype=torch.bool)
            drop[o_cols] = False
            o.weight[:, drop] = 0
    return dense


def test_shrunk_model_equals_masked_dense_model(any_model, windows):
    name, build = any_model
    model = build()
    result = prune(model, sparsity=0.4, method="wanda-sp", calibration=windows, progress=False)
    family = family_for(model)
    for layer in family.layers(model):  # physically smaller
        lay = family.attention_layout(layer)
        assert family.mlp_out(layer).in_features < family.mlp_out(family.layers(build())[0]).in_features
        assert lay.v_head_dim < lay.head_dim
        assert family.attn_in(layer).out_features == lay.num_kv_heads * lay.v_head_dim
        assert family.attn_out(layer).in_features == lay.num_heads * lay.v_head_dim
        for w1 in family.mlp_in(layer):
            assert w1.out_features == family.mlp_out(layer).in_features
    masked = _masked_dense(build, result)
    ids = random_windows(2, 16, seed=7)
    assert torch.allclose(logits(model, ids), logits(masked, ids), atol=1e-5, rtol=0), name


def test_pruned_model_generates(any_model, windows):
    _, build = any_model
    model = build()
    prune(model, sparsity=0.3, method="fasp", calibration=windows, progress=False)
    # a random model may well emit its EOS id; these 6 steps are about the cache, not where a text ends
    model.generation_config.eos_token_id = None
    out = model.generate(windows[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    # the KV-cached greedy path agrees with a full forward on the same tokens
    full = logits(model, out[:, :-1]).argmax(-1)[0, 4:]
    assert torch.equal(full, out[0, 5:])


def test_keep_count_and_alignment():
    assert keep_count(1536, 0.2) == 1229
    assert keep_count(1536, 0.2, align=64) == 1216
    assert keep_count(1536, 0.2, align=32) == 1216
    assert keep_count(64, 0.3, align=8) == 48
    assert keep_count(8, 0.3, align=16) == 6  # width below the alignment: unaligned
    assert keep_count(172, 0.0, align=64) == 172  # nothing removed: nothing rounded
    assert keep_count(100, 0.99, align=16) == 16


def test_score_is_input_norm_times_column_l1():
    w2 = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -0.5]])
    norms = torch.tensor([2.0, 1.0, 10.0])
    assert torch.allclose(score_channels(w2, norms), torch.tensor([8.0, 3.0, 10.0], dtype=torch.float64))
    assert torch.allclose(score_channels(w2, None), torch.tensor([4.0, 3.0, 1.0], dtype=torch.float64))
    assert top_channels(torch.tensor([1.0, 5.0, 5.0, 0.0]), 2).tolist() == [1, 2]


def test_gqa_value_channels_sum_and_map_over_their_query_heads():
    lay = AttentionLayout(num_heads=4, num_kv_heads=2, head_dim=3, v_head_dim=3)
    o_scores = torch.arange(12, dtype=torch.float64)  # column (h, c) = 3h + c
    kv = value_channel_scores(o_scores, lay)
    # KV head 0 serves query heads 0 and 1; channel c sums columns c and 3 + c
    assert kv.tolist() == [[3.0, 5.0, 7.0], [15.0, 17.0, 19.0]]
    kept = torch.tensor([[0, 2], [1, 2]])
    v_rows, o_cols = attention_columns(kept, lay)
    assert v_rows.tolist() == [0, 2, 4, 5]
    assert o_cols.tolist() == [0, 2, 3, 5, 7, 8, 10, 11]


def _layer_problem(seed=0, tokens=400, d=24, out=10):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    w2 = torch.randn(out, d, generator=g, dtype=torch.float64)
    keep = torch.tensor(sorted(torch.randperm(d, generator=g)[:15].tolist()))
    return z, w2, keep


def test_restoration_equals_lstsq_solution():
    z, w2, keep = _layer_problem()
    gram = z.T @ z
    target = z @ w2.T  # the dense layer's outputs, [tokens, out]
    ours = restore_columns(w2, gram, keep, damp=0.0)
    ref = torch.linalg.lstsq(z[:, keep], target).solution.T
    assert torch.allclose(ours, ref, atol=1e-8, rtol=1e-8)
    # with damping: the ridge solution, i.e. lstsq on the augmented system
    damp = 0.05
    lam = damp * torch.diagonal(gram[keep][:, keep]).mean()
    aug_x = torch.cat([z[:, keep], lam.sqrt() * torch.eye(len(keep), dtype=z.dtype)])
    aug_y = torch.cat([target, torch.zeros(len(keep), w2.shape[0], dtype=z.dtype)])
    ref = torch.linalg.lstsq(aug_x, aug_y).solution.T
    assert torch.allclose(restore_columns(w2, gram, keep, damp=damp), ref, atol=1e-8, rtol=1e-8)


def test_restoration_lowers_layer_output_error():
    z, w2, keep = _layer_problem(seed=1)
    target = z @ w2.T
    plain = z[:, keep] @ w2[:, keep].T
    restored = z[:, keep] @ restore_columns(w2, z.T @ z, keep, damp=0.01).T
    err_plain = (plain - target).norm()
    err_restored = (restored - target).norm()
    assert err_restored < 0.8 * err_plain


def test_refit_toward_original_equals_its_closed_form_and_tends_to_no_refit():
    z, w2, keep = _layer_problem(seed=2)
    gram = z.T @ z
    target = z @ w2.T
    damp = 0.3
    lam = damp * torch.diagonal(gram[keep][:, keep]).mean()
    # min ||Z W2ᵀ - Z_M Xᵀ||² + λ'||X - W2_M||²: lstsq on the system augmented with sqrt(λ')·(X - W2_M) = 0
    aug_x = torch.cat([z[:, keep], lam.sqrt() * torch.eye(len(keep), dtype=z.dtype)])
    aug_y = torch.cat([target, lam.sqrt() * w2[:, keep].T])
    ref = torch.linalg.lstsq(aug_x, aug_y).solution.T
    assert torch.allclose(restore_columns(w2, gram, keep, damp, prior="original"), ref, atol=1e-8, rtol=1e-8)
    # λ -> 0: the plain least-squares refit; λ -> ∞: the kept columns untouched (wanda-sp)
    assert torch.allclose(restore_columns(w2, gram, keep, 0.0, prior="original"),
                          restore_columns(w2, gram, keep, 0.0), atol=1e-8)
    far = restore_columns(w2, gram, keep, 1e9, prior="original")
    assert torch.allclose(far, w2[:, keep], atol=1e-6)
    gaps = [(restore_columns(w2, gram, keep, d, prior="original") - w2[:, keep]).norm() for d in (0.01, 0.1, 1, 10)]
    assert gaps == sorted(gaps, reverse=True)


def dense_ffn(model):
    return family_for(model).ffn_dims(model)


def _damped_objective(w2, gram, cols, lam):
    """min_X ||W2 Z − X Z_M||² + λ||X − W2_M||² over the kept columns ``cols``, by its closed form."""
    g_mm = gram[cols][:, cols] + lam * torch.eye(len(cols), dtype=gram.dtype)
    x = torch.linalg.solve(g_mm, (w2 @ gram[:, cols] + lam * w2[:, cols]).T).T
    return refit_error(w2, gram, cols, x) + lam * (x - w2[:, cols]).pow(2).sum().item()


def _obs_objective(w2, gram, cols, lam):
    """What greedy OBS minimizes, ``min (X − W2) (G + λI) (X − W2)ᵀ`` over ``X`` zero outside ``cols``: the damped
    refit objective plus ``λ·||W2||²`` of the removed columns."""
    gone = torch.ones(w2.shape[1], dtype=torch.bool)
    gone[cols] = False
    return _damped_objective(w2, gram, cols, lam) + lam * w2[:, gone].pow(2).sum().item()


@pytest.mark.parametrize("layout", ["columns", "grouped"])
def test_obs_selection_is_the_greedy_minimum_of_the_damped_refit_error(layout):
    z, w2, _ = _layer_problem(seed=4, tokens=300, d=12)
    gram = z.T @ z
    damp = 0.05
    lam = damp * torch.diagonal(gram).mean().item()
    if layout == "columns":  # FFN channels: one column each, 5 of 12 removed
        units, buckets, quotas = torch.arange(12).unsqueeze(1), torch.zeros(12, dtype=torch.long), [5]
    else:  # 4 query heads over 2 KV heads, value dim 3: unit (g, c) owns column c of both heads of group g
        units = torch.tensor([[(2 * g) * 3 + c, (2 * g + 1) * 3 + c] for g in range(2) for c in range(3)])
        buckets, quotas = torch.tensor([0, 0, 0, 1, 1, 1]), [2, 1]
    kept = obs_select(w2, gram, units, buckets, quotas, damp)
    # brute force: at every step remove the unit (within its bucket's quota) whose removal leaves the least objective
    alive, left = set(range(len(units))), list(quotas)
    for _ in range(sum(quotas)):
        def objective(u):
            cols = torch.tensor(sorted(c for v in alive - {u} for c in units[v].tolist()))
            return _obs_objective(w2, gram, cols, lam)
        best = min((u for u in alive if left[int(buckets[u])] > 0), key=objective)
        alive.remove(best)
        left[int(buckets[best])] -= 1
    assert sorted(torch.nonzero(kept).squeeze(1).tolist()) == sorted(alive)


@pytest.mark.parametrize("layout", ["columns", "grouped"])
@pytest.mark.parametrize("block", [1, 3])
def test_obs_curve_adds_up_to_the_objective_after_each_removal(layout, block):
    z, w2, _ = _layer_problem(seed=6, tokens=300, d=12)
    gram = z.T @ z
    damp = 0.05
    lam = damp * torch.diagonal(gram).mean().item()
    if layout == "columns":
        units = torch.arange(12).unsqueeze(1)
    else:  # 4 query heads over 2 KV heads, value dim 3
        units = torch.tensor([[(2 * g) * 3 + c, (2 * g + 1) * 3 + c] for g in range(2) for c in range(3)])
    n = len(units)
    order, rises = obs_curve(w2, gram, units, n - 2, damp, block=block)
    assert len(set(order.tolist())) == n - 2 and rises.shape == (n - 2,) and (rises >= 0).all()
    for step in range(1, n - 1):  # the objective with the first `step` units of the order removed: the running sum
        gone = set(order[:step].tolist())
        cols = torch.tensor(sorted(c for u in range(n) if u not in gone for c in units[u].tolist()))
        assert _obs_objective(w2, gram, cols, lam) == pytest.approx(float(rises[:step].sum()), rel=1e-6)
        if block == 1:  # one unit per step: obs_select's greedy order
            kept = obs_select(w2, gram, units, torch.zeros(n, dtype=torch.long), [step], damp)
            assert set(torch.nonzero(~kept).squeeze(1).tolist()) == gone


@pytest.mark.parametrize("defer", [1, 7, 64])
def test_obs_selection_of_columns_defers_its_updates_without_changing_a_choice(monkeypatch, defer):
    """One-column units apply their rank-1 updates in blocks; every choice is the step-by-step greedy's."""
    from fasp_edge.pipeline import channels

    monkeypatch.setattr(channels, "OBS_DEFER", defer)
    z, w2, _ = _layer_problem(seed=7, tokens=600, d=96, out=20)
    gram = z.T @ z
    damp = 0.01
    buckets, quotas = torch.arange(96) % 3, [30, 25, 20]  # three buckets with their own quotas
    kept = obs_select(w2, gram, torch.arange(96).unsqueeze(1), buckets, quotas, damp)
    # reference: W2 and H⁻¹ updated after every removal
    w = w2.clone()
    h = gram + damp * torch.diagonal(gram).mean() * torch.eye(96, dtype=torch.float64)
    hinv, alive, left = torch.linalg.inv(h), torch.ones(96, dtype=torch.bool), list(quotas)
    for _ in range(sum(quotas)):
        err = w.square().sum(0) / torch.diagonal(hinv)
        err[~alive | torch.tensor([left[int(b)] == 0 for b in buckets])] = math.inf
        j = int(torch.argmin(err))
        r, p = hinv[j].clone(), hinv[j, j].clone()
        w -= torch.outer(w[:, j] / p, r)
        hinv -= torch.outer(r / p, r)
        w[:, j], hinv[j, j] = 0, 1.0
        alive[j] = False
        left[int(buckets[j])] -= 1
    assert torch.equal(kept, alive)


def test_obs_selection_leaves_less_error_than_the_score():
    z, w2, _ = _layer_problem(seed=5, tokens=500, d=32)
    gram = z.T @ z
    by_score = top_channels(score_channels(w2, torch.diagonal(gram).sqrt()), 20)
    by_obs = torch.nonzero(obs_select(w2, gram, torch.arange(32).unsqueeze(1), torch.zeros(32, dtype=torch.long),
                                      [12], 0.01)).squeeze(1)
    errors = [refit_error(w2, gram, k, restore_columns(w2, gram, k, 0.01, "original")) for k in (by_score, by_obs)]
    assert errors[1] < errors[0]


@pytest.mark.parametrize("name", ["opt", "llama-gqa"])
def test_obs_selection_prunes_a_model_closer_to_the_dense_one(windows, name):
    dense = MODEL_BUILDERS[name]()
    before = logits(dense, windows)
    errors = {}
    for selection in ("score", "obs"):
        model = MODEL_BUILDERS[name]()
        r = prune(model, sparsity=0.5, calibration=windows, selection=selection, damp=0.01, refit_prior="original",
                  progress=False)
        assert r.report()["selection"] == selection and r.ffn_dims == [keep_count(d, 0.5) for d in dense_ffn(dense)]
        errors[selection] = (logits(model, windows) - before).pow(2).mean().item()
    assert errors["obs"] < errors["score"]
    with pytest.raises(InvalidArgument, match="--selection obs"):
        prune(MODEL_BUILDERS[name](), sparsity=0.5, calibration=windows, method="wanda-sp", selection="obs",
              progress=False)


def test_held_out_windows_are_part_of_the_statistics_and_apart_in_held(windows):
    from fasp_edge.pipeline.channels import HOLDOUT_EVERY
    from fasp_edge.pipeline.fasp import _capture_layer_inputs, _gather_statistics

    model = MODEL_BUILDERS["llama-gqa"]()
    family = family_for(model)
    layer = family.layers(model)[0]
    hidden, kwargs = _capture_layer_inputs(model, family.layers(model), windows, progress=False)
    cpu = torch.device("cpu")
    every, held, alone, only_held = {}, {}, {}, {}
    _gather_statistics(family, layer, ["mlp", "attn"], hidden, kwargs, cpu, True, True, every, held)
    _gather_statistics(family, layer, ["mlp", "attn"], hidden, kwargs, cpu, True, False, alone, {})
    _gather_statistics(family, layer, ["mlp", "attn"], hidden[HOLDOUT_EVERY - 1::HOLDOUT_EVERY].clone(), kwargs, cpu,
                       True, False, only_held, {})
    for name in ("mlp", "attn"):
        assert every[name].tokens == alone[name].tokens == windows.numel()
        assert torch.allclose(every[name].gram, alone[name].gram, rtol=1e-12, atol=1e-9)
        assert held[name].tokens == only_held[name].tokens == windows.numel() // HOLDOUT_EVERY
        assert torch.allclose(held[name].gram, only_held[name].gram, rtol=1e-12, atol=1e-9)


def test_refit_error_is_the_output_error_and_auto_damp_picks_the_held_out_best():
    z, w2, keep = _layer_problem(seed=3, tokens=600)
    x = restore_columns(w2, z.T @ z, keep, 0.05)
    direct = (z @ w2.T - z[:, keep] @ x.T).pow(2).sum().item()
    assert refit_error(w2, z.T @ z, keep, x) == pytest.approx(direct, rel=1e-9)
    fit, held = z[:450], z[450:]
    for prior in ("zero", "original"):
        errs = {d: refit_error(w2, held.T @ held, keep, restore_columns(w2, fit.T @ fit, keep, d, prior))
                for d in DAMP_GRID}
        values = list(errs.values())
        lowest = values.index(min(values))  # the walk is exact where the error falls, then rises, along the grid
        assert all(a > b for a, b in zip(values[:lowest], values[1:lowest + 1]))
        assert all(a < b for a, b in zip(values[lowest:], values[lowest + 1:]))
        for start in (None, *DAMP_GRID, 0.02):  # from anywhere (off-grid: the nearest point), the same λ
            measured: dict[float, float] = {}
            chosen = choose_damp(w2, fit.T @ fit, held.T @ held, keep, prior, start, measured)
            assert chosen == DAMP_GRID[lowest]
            assert set(measured) <= set(DAMP_GRID) and chosen in measured
            assert all(measured[d] == pytest.approx(errs[d], rel=1e-9) for d in measured)
        measured = {}
        choose_damp(w2, fit.T @ fit, held.T @ held, keep, prior, DAMP_GRID[lowest], measured)
        assert len(measured) <= 3  # started at the best: the point and its neighbours


@pytest.mark.parametrize("prior", ["zero", "original"])
def test_auto_damp_prunes_and_records_each_pairs_choice(windows, prior):
    model = MODEL_BUILDERS["llama-gqa"]()
    r = prune(model, sparsity=0.5, calibration=windows, damp="auto", refit_prior=prior, progress=False)
    report = r.report()
    assert report["damp"] == "auto" and report["refit_prior"] == prior
    assert all(d in DAMP_GRID for d in report["damp_chosen"]["mlp"] + report["damp_chosen"]["attn"])
    searches = sum(d is not None for d in report["damp_chosen"]["mlp"] + report["damp_chosen"]["attn"])
    searches *= 2 if report["selection"] == "obs" else 1  # OBS searches once for its selection, once for the refit
    assert 2 * searches <= report["damp_solves"] < len(DAMP_GRID) * searches  # the walk, not the whole grid
    assert len(report["damp_chosen"]["mlp"]) == 2 and r.ffn_dims == [24, 24]
    with torch.no_grad():
        assert torch.isfinite(model(windows, use_cache=False).logits).all()


def test_auto_damp_needs_windows_to_hold_out_and_bad_priors_are_refused(windows):
    with pytest.raises(InvalidArgument, match="--nsamples"):
        prune(MODEL_BUILDERS["opt"](), sparsity=0.5, calibration=windows[:3], damp="auto", progress=False)
    with pytest.raises(InvalidArgument, match="--nsamples 4 or more"):  # auto is the default
        prune(MODEL_BUILDERS["opt"](), sparsity=0.5, calibration=windows[:3], progress=False)
    # wanda-sp and magnitude never refit, so they need no held-out windows
    prune(MODEL_BUILDERS["opt"](), sparsity=0.5, calibration=windows[:3], method="wanda-sp", progress=False)
    with pytest.raises(InvalidArgument, match="--refit-prior"):
        prune(MODEL_BUILDERS["opt"](), sparsity=0.5, calibration=windows, refit_prior="mean", progress=False)
    with pytest.raises(InvalidArgument, match="--damp"):
        prune(MODEL_BUILDERS["opt"](), sparsity=0.5, calibration=windows, damp="often", progress=False)


def test_sequential_statistics_see_the_pruned_attention(windows, monkeypatch):
    import fasp_edge.pipeline.fasp as fasp_module

    build = MODEL_BUILDERS["llama-gqa"]
    grams = {}
    real = fasp_module.prune_mlp

    def recording(family, layer, keep_k, stats, refit):
        grams.setdefault(id(layer), stats.gram.clone())
        return real(family, layer, keep_k, stats, refit)

    monkeypatch.setattr(fasp_module, "prune_mlp", recording)
    seen = {}
    for sequential in (False, True):
        grams.clear()
        model = build()
        r = prune(model, sparsity=0.5, calibration=windows, sequential=sequential, progress=False)
        assert r.report()["sequential_statistics"] is sequential
        seen[sequential] = grams[id(family_for(model).layers(model)[0])]
    # by hand: the same attention pruning alone, then the first MLP's inputs over the windows
    hand = build()
    prune(hand, sparsity=0.5, calibration=windows, targets=["attn"], progress=False)
    stats = InputStatistics(48)
    down = family_for(hand).mlp_out(family_for(hand).layers(hand)[0])
    h = down.register_forward_pre_hook(lambda m, args: stats.update(args[0]))
    with torch.no_grad():
        hand(windows, use_cache=False)
    h.remove()
    assert torch.allclose(seen[True], stats.gram, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen[False], stats.gram, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["opt", "llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("rule", ["standardized", "energy", "error", "uniform"])
def test_param_reduction_meets_its_budget(windows, name, rule):
    for reduction, align in ((0.1, 1), (0.25, 1), (0.25, 8)):
        model = MODEL_BUILDERS[name]()
        r = prune(model, param_reduction=reduction, allocation=rule, calibration=windows, align=align,
                  progress=False)
        achieved = 1 - r.params_after / r.params_before
        assert abs(achieved - reduction) < 0.01, (reduction, align, achieved)  # tiny models: coarse units
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
        if align > 1:
            assert all(d % align == 0 for d in r.ffn_dims)
        report = r.report()
        assert report["param_reduction_target"] == reduction and report["allocation"] == rule
        assert report["sparsity"] is None
        with torch.no_grad():
            assert torch.isfinite(model(windows, use_cache=False).logits).all()
        if rule == "uniform" and align == 1:  # every MLP loses the same fraction, give or take one channel
            assert max(r.ffn_dims) - min(r.ffn_dims) <= 1
    # magnitude reads no data: every rule values the channels from the weights alone
    r = prune(MODEL_BUILDERS[name](), param_reduction=0.2, allocation=rule, method="magnitude", progress=False)
    assert abs((1 - r.params_after / r.params_before) - 0.2) < 0.01


def test_param_reduction_spreads_the_cut_by_the_statistics(windows):
    from fasp_edge.pipeline.allocation import PairUnits, allocate

    # two pairs of equal cost: the one whose units are worth less loses more of them
    cheap = PairUnits(0, "mlp", torch.linspace(-2, 0, 10, dtype=torch.float64), 5, 1, 1)
    dear = PairUnits(1, "mlp", torch.linspace(0.5, 2, 10, dtype=torch.float64), 5, 1, 1)
    keep, removed = allocate([cheap, dear], 60)
    assert keep == {(0, "mlp"): 1, (1, "mlp"): 7} and removed == 60
    with pytest.raises(InvalidArgument, match="removable"):
        allocate([cheap, dear], 200)
    with pytest.raises(InvalidArgument, match="not both"):
        prune(MODEL_BUILDERS["opt"](), sparsity=0.2, param_reduction=0.2, calibration=windows, progress=False)
    with pytest.raises(InvalidArgument, match="--allocation"):
        prune(MODEL_BUILDERS["opt"](), param_reduction=0.2, allocation="flat", calibration=windows, progress=False)


def test_streaming_statistics_equal_all_at_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, 16, generator=g)
    whole = InputStatistics(16)
    whole.update(x)
    streamed = InputStatistics(16)
    for chunk in x.reshape(-1, 16).split(11):
        streamed.update(chunk)
    norms_only = InputStatistics(16, gram=False)
    for chunk in x.split(1):
        norms_only.update(chunk)
    z = x.reshape(-1, 16).double()
    assert streamed.tokens == whole.tokens == 185
    assert torch.allclose(streamed.gram, z.T @ z, atol=1e-10, rtol=0)
    assert torch.allclose(whole.gram, streamed.gram, atol=1e-10, rtol=0)
    assert torch.allclose(norms_only.norms, z.norm(dim=0), atol=1e-10, rtol=0)
    assert torch.allclose(streamed.norms, z.norm(dim=0), atol=1e-10, rtol=0)


@pytest.mark.slow
def test_fasp_matches_dense_better_than_wanda_sp(windows):
    build = MODEL_BUILDERS["llama-gqa"]
    dense = logits(build(), windows)
    errs = {}
    for method in ("wanda-sp", "fasp"):
        model = build()
        prune(model, sparsity=0.3, method=method, calibration=windows, progress=False)
        errs[method] = (logits(model, windows) - dense).pow(2).mean().item()
    assert errs["fasp"] < errs["wanda-sp"]


@pytest.mark.slow
def test_same_seed_same_weights(windows):
    build = MODEL_BUILDERS["qwen2-bias"]
    states = []
    for _ in range(2):
        model = build()
        prune(model, sparsity=0.25, calibration=windows, align=2, progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_parameter_counts(windows):
    model = MODEL_BUILDERS["llama-gqa"]()
    r = prune(model, sparsity=0.5, calibration=windows, progress=False)
    # per layer: FFN 48 -> 24 removes 3 * 32 * 24; value dim 8 -> 4 removes 2*4*32 (v) + 4*4*32 (o)
    removed = 2 * (3 * 32 * 24 + 2 * 4 * 32 + 4 * 4 * 32)
    assert r.params_before - r.params_after == removed
    assert r.nonembedding_params_before - r.nonembedding_params_after == removed
    assert r.params_before - r.nonembedding_params_before == 96 * 32  # tied embedding counted once
    assert r.ffn_dims == [24, 24] and r.v_head_dims == [4, 4]


def test_mlp_only_targets_leave_attention_alone(windows):
    model = MODEL_BUILDERS["opt"]()
    r = prune(model, sparsity=0.5, targets=["mlp"], calibration=windows, progress=False)
    assert r.v_head_dims == [8, 8] and r.ffn_dims == [32, 32]


@pytest.mark.parametrize("name", ["llama-gqa", "opt"])
def test_a_stopped_prune_continues_from_its_saved_progress_to_the_same_weights(name, windows, tmp_path, monkeypatch):
    from fasp_edge.pipeline import fasp as fasp_module

    def settings():
        return dict(param_reduction=0.2, calibration=windows, align=4, damp="auto", progress=False)

    whole = prune(MODEL_BUILDERS[name](), **settings())
    folder = tmp_path / "progress"
    real = fasp_module._prune_layer

    def stop_at_layer_1(run, idx, *args):
        if idx == 1:
            raise KeyboardInterrupt
        return real(run, idx, *args)

    # stopped in the allocation pass, at its second layer
    real_units = fasp_module.pair_units

    def stop_valuing_layer_1(family, layer, idx, *args):
        if idx == 1:
            raise KeyboardInterrupt
        return real_units(family, layer, idx, *args)

    monkeypatch.setattr(fasp_module, "pair_units", stop_valuing_layer_1)
    with pytest.raises(KeyboardInterrupt):
        prune(MODEL_BUILDERS[name](), **settings(), resume_dir=folder)
    monkeypatch.setattr(fasp_module, "pair_units", real_units)
    saved = json.loads((folder / "progress.json").read_text())
    assert saved["allocation_layers_done"] == 1 and saved["layers_done"] == 0
    assert not (folder / "allocation.pt").exists()

    # continued, then stopped again at the second layer of the prune itself
    valued = []
    monkeypatch.setattr(fasp_module, "pair_units", lambda f, l, idx, *a: valued.append(idx) or real_units(f, l, idx, *a))
    monkeypatch.setattr(fasp_module, "_prune_layer", stop_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        prune(MODEL_BUILDERS[name](), **settings(), resume_dir=folder)
    monkeypatch.setattr(fasp_module, "_prune_layer", real)
    assert valued and min(valued) == 1  # layer 0's values came from the saved pass
    saved = json.loads((folder / "progress.json").read_text())
    assert saved["layers_done"] == 1 and (folder / "allocation.pt").is_file() and (folder / "layer-000.pt").is_file()
    assert not (folder / "allocation-pass.pt").exists() and "allocation_layers_done" not in saved
    assert not list(folder.glob(".*tmp*"))  # nothing half-written

    pruned_again = []
    monkeypatch.setattr(fasp_module, "_prune_layer", lambda run, idx, *a: pruned_again.append(idx) or real(run, idx, *a))
    monkeypatch.setattr(fasp_module, "_allocate", lambda *a, **k: pytest.fail("the saved allocation was not reused"))
    resumed = prune(MODEL_BUILDERS[name](), **settings(), resume_dir=folder)
    assert pruned_again == list(range(1, len(whole.ffn_dims)))
    assert resumed.resumed_layers == 1 and resumed.report()["resumed_layers"] == 1
    # every layer's seconds are in the report, the saved run's layer 0 among them
    assert len(resumed.report()["layer_seconds"]) == len(whole.report()["layer_seconds"]) == len(whole.ffn_dims)
    assert resumed.report()["layer_seconds"][0] == saved["run"]["layer_seconds"][0] > 0
    assert resumed.ffn_dims == whole.ffn_dims and resumed.v_head_dims == whole.v_head_dims
    assert resumed.report()["damp_chosen"] == whole.report()["damp_chosen"]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # another calibration (or model, or setting) never continues this progress
    with pytest.raises(InvalidArgument, match="another model, calibration or settings"):
        prune(MODEL_BUILDERS[name](), **{**settings(), "calibration": windows.flip(0)}, resume_dir=folder)
