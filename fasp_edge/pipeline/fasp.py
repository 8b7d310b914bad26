"""FASP (Hu et al., 2025) and the baselines that share its structure.

For each decoder layer in order, with calibration activations propagated through the already pruned
layers before it:

1. one pass over the calibration windows gathers, for each pruned pair ``y = W2 · f(W1 · x)``, the
   float64 Gram matrix ``G = Z Zᵀ`` of ``W2``'s input ``Z``;
2. channels are scored with ``score_j = ||Z_j||₂ · Σ_i |W2[i, j]|`` (summed over the query heads that
   share a value channel under GQA) and the top ``k`` are kept (the same ``k`` in every KV head); or, with
   ``selection="obs"``, removed one at a time by the output error their removal leaves after the refit
   (:func:`obs_select`);
3. the kept columns of ``W2`` are refit by damped least squares,
   ``W2'[:, M] = W2 · G[:, M] · (G[M, M] + λ·mean(diag G[M, M])·I)⁻¹`` (``refit_prior="zero"``), or, damped
   toward the kept columns as they were (``refit_prior="original"``: ``min ||W2 Z − X Z_M||² + λ'||X − W2_M||²``),
   ``W2'[:, M] = (W2 · G[:, M] + λ'·W2[:, M]) · (G[M, M] + λ'·I)⁻¹``, which tends to ``wanda-sp`` (no refit) as λ
   grows; ``damp="auto"`` picks λ for each pair from :data:`DAMP_GRID` by the reconstruction error on every
   ``HOLDOUT_EVERY``-th calibration window, held out of the fit (the chosen λ is then refit on all windows);
4. ``W1``'s dead rows (and bias entries) and ``W2``'s dropped columns are physically removed;
5. a second pass runs the pruned layer to produce the next layer's inputs.

``magnitude`` scores by ``Σ_i |W2[i, j]|`` alone and needs no data; ``wanda-sp`` uses the FASP score
without step 3. ``--sparsity`` keeps the same fraction of every pair; ``--param-reduction`` sets each pair's kept
width from a global budget first (:mod:`.allocation`). ``sequential`` statistics prune a layer's attention before
gathering its MLP's statistics.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidArgument
from ..models import count_embedding_parameters, count_parameters, family_for
from ..models.base import AttentionLayout, ModelFamily, empty_linear
from .stats import InputStatistics

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda-sp", "fasp")
TARGETS = ("mlp", "attn")
REFIT_PRIORS = ("zero", "original")
SELECTIONS = ("auto", "score", "obs")  # auto: obs for fasp (the refit it ranks by), score for the others
DAMP_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
HOLDOUT_EVERY = 4  # damp="auto": windows 3, 7, 11, ... measure each candidate λ, the others fit it
ALLOCATION_WINDOWS = 32  # --param-reduction values channels by input norms over the first 32 calibration windows
# the refit's defaults (module docstring, step 3): λ per pair on held-out windows, damped toward the kept weights, OBS
# for fasp; measured better than the earlier damp=0.01, refit_prior="zero", selection="score" (README)
DEFAULT_DAMP = "auto"
DEFAULT_REFIT_PRIOR = "original"
DEFAULT_SELECTION = "auto"
DEFAULT_ALLOCATION = "error"  # --param-reduction's rule (:data:`.allocation.RULES`), chosen on held-out text
ERROR_CURVE_WINDOWS = 16  # ... or, --allocation error, by error curves from the first 16 windows' Gram matrices


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def check_prune_arguments(sparsity: float | None, method: str, align: int, targets: Iterable[str],
                          damp: float | str, refit_prior: str = DEFAULT_REFIT_PRIOR,
                          param_reduction: float | None = None, allocation: str = DEFAULT_ALLOCATION,
                          selection: str = DEFAULT_SELECTION, nsamples: int | None = None) -> None:
    """Raise :class:`InvalidArgument` for any setting outside its range (before any work starts); ``nsamples``, the
    calibration windows to come, when known."""
    from .allocation import RULES

    if (sparsity is None) == (param_reduction is None):
        raise InvalidArgument("give either --sparsity (the same fraction of channels in every pair) or "
                              "--param-reduction (a fraction of all parameters, spread over the layers), not both")
    if param_reduction is not None:
        if not (isinstance(param_reduction, (int, float)) and math.isfinite(param_reduction)
                and 0 < param_reduction < 1):
            raise InvalidArgument(f"--param-reduction must be in (0, 1), got {param_reduction}; e.g. 0.2 removes "
                                  "20% of all parameters")
        if allocation not in RULES:
            raise InvalidArgument(f"unknown --allocation {allocation!r}; choose one of {', '.join(RULES)}")
    elif not (isinstance(sparsity, (int, float)) and math.isfinite(sparsity) and 0 <= sparsity < 1):
        raise InvalidArgument(f"--sparsity must be in [0, 1), got {sparsity}; e.g. --sparsity 0.2 removes 20% "
                              "of the channels of every pruned pair")
    if method not in METHODS:
        raise InvalidArgument(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if not (isinstance(align, int) and align >= 1 and align & (align - 1) == 0):
        raise InvalidArgument(f"--align must be a positive power of two (1, 8, 16, 32, 64), got {align}")
    targets = list(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise InvalidArgument(f"--targets must name some of {', '.join(TARGETS)}, got {','.join(targets) or 'nothing'}")
    if damp != "auto" and not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise InvalidArgument(f"--damp must be a finite number >= 0 or 'auto', got {damp}")
    if selection not in SELECTIONS:
        raise InvalidArgument(f"unknown --selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    if selection == "obs" and method != "fasp":
        raise InvalidArgument("--selection obs chooses channels by the error left after FASP's refit; it needs "
                              "--method fasp (wanda-sp and magnitude select by their score)")
    if refit_prior not in REFIT_PRIORS:
        raise InvalidArgument(f"unknown --refit-prior {refit_prior!r}; choose one of {', '.join(REFIT_PRIORS)}")
    cuts = param_reduction is not None or (sparsity or 0) > 0
    if damp == "auto" and method == "fasp" and cuts and nsamples is not None and nsamples < HOLDOUT_EVERY:
        raise InvalidArgument(f"--damp auto (the default) holds every {HOLDOUT_EVERY}th calibration window out to "
                              f"choose λ, and {nsamples} window(s) leave none: give --nsamples {HOLDOUT_EVERY} or "
                              "more, or a number for --damp (e.g. 0.01)")


def resolve_selection(selection: str, method: str) -> str:
    """``"auto"`` is OBS for fasp (it ranks channels by the error left after the refit), the score otherwise."""
    if selection != "auto":
        return selection
    return "obs" if method == "fasp" else "score"


def keep_count(width: int, sparsity: float, align: int = 1) -> int:
    """How many of ``width`` channels survive: ``width - floor(sparsity · width)``, rounded to ``align``.

    Alignment rounds to the nearest multiple of ``align`` (halves up; at least ``align``, at most ``width``) and is
    skipped where nothing is removed or where ``width`` itself is smaller than ``align``.
    """
    return aligned_width(width - int(math.floor(sparsity * width + 1e-9)), width, align)


def aligned_width(keep: int, width: int, align: int) -> int:
    """``keep`` of ``width`` channels rounded to the nearest multiple of ``align`` (halves up; at least ``align``,
    at most ``width``); unchanged where nothing is removed or where ``width`` itself is smaller than ``align``."""
    if keep == width or align <= 1 or width < align:
        return keep
    return int(min(width, max(align, align * math.floor(keep / align + 0.5))))


def pair_output(family: ModelFamily, layer: nn.Module, kind: str) -> nn.Linear:
    """The second Linear of ``layer``'s ``kind`` pair (``"attn"``: the output projection; ``"mlp"``: W2)."""
    return family.attn_out(layer) if kind == "attn" else family.mlp_out(layer)


# --------------------------------------------------------------------------------------------------
# the math, one function each
# --------------------------------------------------------------------------------------------------
def score_channels(w2: torch.Tensor, input_norms: torch.Tensor | None) -> torch.Tensor:
    """Wanda-style column score ``||Z_j||₂ · Σ_i |W2[i, j]|`` (column L1 norm alone without norms)."""
    l1 = w2.detach().to(torch.float64).abs().sum(0)
    return l1 if input_norms is None else l1 * input_norms.to(l1)


def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last dim, in ascending index order.

    Ties go to the lower index, so the choice is deterministic.
    """
    order = torch.sort(-scores, dim=-1, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def value_channel_scores(o_scores: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """Scores of ``o_proj`` input columns ``(h, c)`` summed per value channel ``(g, c)``: ``[kv_heads, v_dim]``."""
    per_head = o_scores.view(layout.num_heads, layout.v_head_dim)
    return per_head.view(layout.num_kv_heads, layout.group_size, layout.v_head_dim).sum(1)


def attention_columns(kept: torch.Tensor, layout: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Map kept value channels ``[kv_heads, k]`` to ``v_proj`` rows and ``o_proj`` columns to keep."""
    d = layout.v_head_dim
    kv = torch.arange(layout.num_kv_heads, device=kept.device).unsqueeze(1)
    v_rows = (kv * d + kept).reshape(-1)
    heads = torch.arange(layout.num_heads, device=kept.device).unsqueeze(1)
    o_cols = (heads * d + kept[heads.squeeze(1) // layout.group_size]).reshape(-1)
    return v_rows, o_cols


def value_channel_groups(layout: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Every value channel as an :func:`obs_select` unit: ``[kv_heads * v_head_dim, group_size]`` o_proj columns
    (unit ``g·d + c``: channel ``c`` of KV head ``g``, read by each of its query heads) and each unit's KV head."""
    kv, d, group = layout.num_kv_heads, layout.v_head_dim, layout.group_size
    _, every_col = attention_columns(torch.arange(d).expand(kv, d), layout)  # o_proj column of (head, channel)
    return every_col.view(kv, group, d).transpose(1, 2).reshape(kv * d, group), torch.arange(kv).repeat_interleave(d)


def restore_columns(w2: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float,
                    prior: str = "zero") -> torch.Tensor:
    """Least-squares refit of the kept columns of ``W2`` (returned as ``[out, len(keep)]`` in float64).

    With ``λ' = λ·mean(diag G_MM)``, solves ``min_X ||W2 Z − X Z_M||² + λ'·||X − P||²`` in closed form,
    ``X = (W2 G[:, M] + λ' P) (G[M, M] + λ' I)⁻¹``, where the prior ``P`` is 0 (``"zero"``: ridge) or the kept
    columns themselves, ``W2[:, M]`` (``"original"``: the refit leans toward no refit at all).
    """
    g = gram.to(torch.float64)
    w = w2.detach().to(g)
    return _damped_solve(g[keep][:, keep], w @ g[:, keep], w[:, keep], damp, prior)


def _damped_solve(g_mm: torch.Tensor, base: torch.Tensor, w_keep: torch.Tensor, damp: float,
                  prior: str) -> torch.Tensor:
    """:func:`restore_columns` given ``G[M, M]``, ``W2 G[:, M]`` and ``W2[:, M]`` (what every λ shares)."""
    reg = damp * torch.diagonal(g_mm).mean()
    a = g_mm + reg * torch.eye(g_mm.shape[0], dtype=g_mm.dtype, device=g_mm.device)
    rhs = base
    if prior == "original":
        rhs = rhs + reg * w_keep
    rhs = rhs.T  # [k, out]
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(rhs, chol)
    else:  # singular even after damping (e.g. dead channels with damp=0): minimum-norm solution
        x = torch.linalg.lstsq(a, rhs, driver="gelsd" if a.device.type == "cpu" else None).solution
    return x.T


def refit_error(w2: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, x: torch.Tensor) -> float:
    """``||W2 Z − X Z_M||²`` over the tokens behind ``gram``, from the Gram matrix alone."""
    return _refit_error_fn(w2, gram, keep)(x)


def _refit_error_fn(w2: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor):
    """:func:`refit_error` as a function of ``X`` alone, with what does not depend on ``X`` computed once."""
    g = gram.to(torch.float64)
    w = w2.detach().to(g)
    g_rows = g[keep]
    dense, cross, g_mm = (w @ g * w).sum(), w @ g_rows.T, g_rows[:, keep]  # cross: W2 G[:, M]

    def error(x: torch.Tensor) -> float:
        x = x.to(g)
        return float(dense - 2 * (x * cross).sum() + (x @ g_mm * x).sum())
    return error


def choose_damp(w2: torch.Tensor, fit_gram: torch.Tensor, held_gram: torch.Tensor, keep: torch.Tensor,
                prior: str) -> float:
    """The λ of :data:`DAMP_GRID` whose refit on ``fit_gram`` best reconstructs the held-out tokens' output."""
    g = fit_gram.to(torch.float64)
    w = w2.detach().to(g)
    g_mm, base, w_keep = g[keep][:, keep], w @ g[:, keep], w[:, keep]  # shared by every λ
    error = _refit_error_fn(w2, held_gram, keep)
    errors = {d: error(_damped_solve(g_mm, base, w_keep, d, prior)) for d in DAMP_GRID}
    return min(errors, key=errors.get)


def _obs_start(w2: torch.Tensor, gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS's starting state: a float64 copy of ``W2`` and ``H⁻¹``, ``H = G + λ'I``, ``λ' = damp·mean(diag G)``."""
    g = gram.to(torch.float64)
    reg = max(damp, 1e-6) * torch.diagonal(g).mean().clamp_min(1e-12)
    h = g + reg * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return w2.detach().to(g).clone(), torch.cholesky_inverse(torch.linalg.cholesky(h))


def _obs_errors(w: torch.Tensor, hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """How much removing each unit alone (its ``groups`` columns) would raise the objective now:
    ``tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ)``, a ratio for one column per unit."""
    if groups.shape[1] == 1:  # one column per unit: no solve
        return w.square().sum(0)[groups[:, 0]] / torch.diagonal(hinv)[groups[:, 0]]
    h_ss = hinv[groups.unsqueeze(2), groups.unsqueeze(1)]  # [n, s, s]
    w_s = w[:, groups].permute(1, 2, 0)  # [n, s, out]
    return (w_s * torch.linalg.solve(h_ss, w_s)).sum((1, 2))


def obs_select(w2: torch.Tensor, gram: torch.Tensor, groups: torch.Tensor, buckets: torch.Tensor,
               quotas: list[int], damp: float) -> torch.Tensor:
    """Greedy OBS selection (ZipLM-style): which column groups of ``W2`` to keep.

    ``groups`` is ``[n, s]``: the ``W2`` columns each removable unit owns (an FFN channel: one column; a value
    channel: one column per query head that reads it); ``buckets[n]`` places each unit in a bucket (a KV head) from
    which exactly ``quotas[b]`` units are removed. With ``H = G + λ'I`` (``λ' = damp · mean(diag G)``) and ``H⁻¹``
    kept up to date, each step removes the unit whose removal, with the best refit of everything still kept, raises
    ``(X − W2) H (X − W2)ᵀ`` least (``X`` zero on the removed columns: the refit's damped objective
    ``||W2 Z − X Z_M||² + λ'||X − W2_M||²`` plus ``λ'||W2||²`` of the removed columns), by
    ``tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ)``; then ``W2`` and ``H⁻¹`` take the matching rank-``s`` updates. Returns a bool mask
    ``[n]`` of the units kept.
    """
    w, hinv = _obs_start(w2, gram, damp)
    alive = torch.ones(groups.shape[0], dtype=torch.bool, device=groups.device)
    left = [int(q) for q in quotas]
    open_ = alive.clone()  # alive and its bucket still owes removals
    for b, q in enumerate(left):
        if q <= 0:
            open_[buckets == b] = False
    single = groups.shape[1] == 1
    for _ in range(sum(left)):
        err = _obs_errors(w, hinv, groups)
        best = int(torch.argmin(torch.where(open_, err, torch.full_like(err, math.inf))))
        s = groups[best]
        if single:
            j = int(s[0])
            rows, pivot = hinv[j].clone(), hinv[j, j]
            w.addr_(w[:, j] / pivot, rows, alpha=-1)
            hinv.addr_(rows / pivot, rows, alpha=-1)
        else:
            rows = hinv[s].clone()  # [s, d]
            inv_ss = torch.linalg.inv(rows[:, s])
            w.addmm_(w[:, s] @ inv_ss, rows, alpha=-1)
            hinv.addmm_(rows.T @ inv_ss, rows, alpha=-1)
        w[:, s] = 0
        hinv[s, s] = 1.0  # its row and column are now zero: a unit diagonal keeps every H⁻¹_SS solvable
        alive[best] = open_[best] = False
        b = int(buckets[best])
        left[b] -= 1
        if left[b] == 0:
            open_[buckets == b] = False
    return alive


def obs_curve(w2: torch.Tensor, gram: torch.Tensor, groups: torch.Tensor, removals: int, damp: float,
              block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """How :func:`obs_select`'s objective rises as ``removals`` units go, greedily, ``block`` units per step.

    Each step takes the ``block`` units whose removal alone would raise the objective least, removes them in that
    order and updates ``W2`` and ``H⁻¹`` once (one rank-``block·s`` update instead of ``block`` rank-``s`` ones;
    ``block=1`` is :func:`obs_select`'s greedy order without buckets). Within a step the rises are exact for that
    order: with ``H⁻¹_SS = L Lᵀ``, the ``j``-th removed column adds ``||(W_S L⁻ᵀ)[:, j]||²``. Returns the units in
    removal order and each one's rise (``[removals]`` float64), so the running sum is the objective after each.
    """
    w, hinv = _obs_start(w2, gram, damp)
    n, s = groups.shape
    alive = torch.ones(n, dtype=torch.bool, device=groups.device)
    order, rises, done = [], [], 0
    while done < removals:
        err = torch.where(alive, _obs_errors(w, hinv, groups), torch.full_like(alive, math.inf, dtype=w.dtype))
        units = torch.topk(err, min(block, removals - done), largest=False).indices  # ascending
        cols = groups[units].reshape(-1)
        rows = hinv[cols].clone()  # [b·s, d]
        chol = torch.linalg.cholesky(rows[:, cols])
        u = torch.linalg.solve_triangular(chol, w[:, cols].T, upper=False)  # (W_S L⁻ᵀ)ᵀ
        rises.append(u.square().sum(1).view(-1, s).sum(1))
        step = torch.cholesky_solve(rows, chol)  # H⁻¹_SS⁻¹ H⁻¹_S:
        w.addmm_(w[:, cols], step, alpha=-1)
        hinv.addmm_(rows.T, step, alpha=-1)
        w[:, cols] = 0
        hinv[cols] = 0
        hinv[:, cols] = 0
        hinv[cols, cols] = 1.0  # a unit diagonal keeps every later H⁻¹_SS solvable
        alive[units] = False
        order.append(units)
        done += len(units)
    if not order:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    return torch.cat(order), torch.cat(rises)


def _take_rows(lin: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = empty_linear(lin.in_features, len(rows), lin.bias is not None, lin)
    with torch.no_grad():
        new.weight.copy_(lin.weight[rows.to(lin.weight.device)])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[rows.to(lin.bias.device)])
    return new


def _take_columns(lin: nn.Linear, cols: torch.Tensor, weight: torch.Tensor | None) -> nn.Linear:
    new = empty_linear(len(cols), lin.out_features, lin.bias is not None, lin)
    with torch.no_grad():
        new.weight.copy_(lin.weight[:, cols.to(lin.weight.device)] if weight is None else weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


# --------------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------------
@dataclass
class LayerDecision:
    """What was kept in one layer (indices into the layer's widths before pruning)."""

    mlp_keep: torch.Tensor | None = None  # [k] FFN channels
    attn_keep: torch.Tensor | None = None  # [kv_heads, k] value channels per KV head
    mlp_damp: float | None = None  # the λ each refit was solved with (None: not refit)
    attn_damp: float | None = None


@dataclass
class Refit:
    """How a pair's kept columns are refit: ``damp`` a number or ``"auto"`` (then ``held`` holds the held-out
    windows' statistics, which the pair's full statistics include)."""

    damp: float | str = 0.01
    prior: str = "zero"
    held: InputStatistics | None = None
    selection: str = "score"  # "obs": units chosen by obs_select instead of the column score

    def _damp(self, w2: torch.Tensor, stats: InputStatistics, keep: torch.Tensor) -> float:
        if self.damp == "auto":
            return choose_damp(w2, stats.gram - self.held.gram, self.held.gram, keep, self.prior)
        return float(self.damp)

    def weights(self, w2: torch.Tensor, stats: InputStatistics, keep: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The refit kept columns (in ``w2``'s dtype) and the λ they were solved with."""
        damp = self._damp(w2, stats, keep)
        return restore_columns(w2, stats.gram, keep, damp, self.prior).to(w2.dtype), damp

    def select(self, w2: torch.Tensor, stats: InputStatistics, scored_keep: torch.Tensor, groups: torch.Tensor,
               buckets: torch.Tensor, quotas: list[int]) -> torch.Tensor:
        """``obs_select``'s kept-unit mask, damped with the λ this refit would use on the score's choice."""
        return obs_select(w2, stats.gram, groups, buckets, quotas, self._damp(w2, stats, scored_keep))


def prune_mlp(family: ModelFamily, layer: nn.Module, keep_k: int, stats: InputStatistics | None,
              refit: Refit | None) -> tuple[torch.Tensor, float | None]:
    """Prune the MLP pair to ``keep_k`` channels (refit when ``refit`` is given); the kept channels and the λ."""
    w2 = family.mlp_out(layer)
    scores = score_channels(w2.weight, stats.norms if stats is not None else None)
    keep = top_channels(scores, keep_k).to(w2.weight.device)
    if keep_k == w2.in_features:
        return keep, None
    if refit is not None and refit.selection == "obs":
        width = w2.in_features
        units = torch.arange(width, device=keep.device).unsqueeze(1)
        mask = refit.select(w2.weight, stats, keep, units, torch.zeros(width, dtype=torch.long, device=keep.device),
                            [width - keep_k])
        keep = torch.nonzero(mask).squeeze(1)
    new_w, damp = refit.weights(w2.weight, stats, keep) if refit else (None, None)
    family.set_mlp(layer, [_take_rows(m, keep) for m in family.mlp_in(layer)], _take_columns(w2, keep, new_w))
    return keep, damp


def prune_attention(family: ModelFamily, layer: nn.Module, keep_k: int, stats: InputStatistics | None,
                    refit: Refit | None) -> tuple[torch.Tensor, float | None]:
    """Prune the value/output pair to ``keep_k`` channels per KV head; the kept channels and the λ."""
    layout = family.attention_layout(layer)
    o = family.attn_out(layer)
    scores = score_channels(o.weight, stats.norms if stats is not None else None)
    kept = top_channels(value_channel_scores(scores, layout), keep_k)
    if keep_k == layout.v_head_dim:
        return kept, None
    if refit is not None and refit.selection == "obs":
        kv, d = layout.num_kv_heads, layout.v_head_dim
        units, buckets = value_channel_groups(layout)
        _, scored_cols = attention_columns(kept, layout)
        mask = refit.select(o.weight, stats, scored_cols.to(o.weight.device), units.to(o.weight.device),
                            buckets.to(o.weight.device), [d - keep_k] * kv)
        kept = torch.nonzero(mask.view(kv, d).cpu())[:, 1].view(kv, keep_k).to(kept.device)
    v_rows, o_cols = (t.to(o.weight.device) for t in attention_columns(kept, layout))
    new_w, damp = refit.weights(o.weight, stats, o_cols) if refit else (None, None)
    family.set_attn(layer, _take_rows(family.attn_in(layer), v_rows), _take_columns(o, o_cols, new_w), keep_k)
    return kept, damp


# --------------------------------------------------------------------------------------------------
# the layer-sequential driver
# --------------------------------------------------------------------------------------------------
@dataclass
class PruneResult:
    """The pruned model (pruned in place) and what was measured while pruning it."""

    model: nn.Module
    method: str
    sparsity: float | None
    targets: tuple[str, ...]
    align: int
    damp: float | str
    ffn_dims: list[int]
    v_head_dims: list[int]
    decisions: list[LayerDecision]
    params_before: int
    params_after: int
    nonembedding_params_before: int
    nonembedding_params_after: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    refit_prior: str = "zero"
    sequential: bool = False
    selection: str = "score"
    param_reduction: float | None = None  # the target of --param-reduction (None: --sparsity)
    allocation: str | None = None

    def report(self) -> dict[str, Any]:
        """JSON-ready summary (``fasp_report.json``)."""
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "targets": list(self.targets),
            "align": self.align,
            "damp": self.damp,
            "refit_prior": self.refit_prior,
            "sequential_statistics": self.sequential,
            "selection": self.selection,
            **({"param_reduction_target": self.param_reduction, "allocation": self.allocation}
               if self.param_reduction is not None else {}),
            **({"damp_chosen": {"mlp": [d.mlp_damp for d in self.decisions],
                                "attn": [d.attn_damp for d in self.decisions]}} if self.damp == "auto" else {}),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_reduction": 1 - self.params_after / self.params_before,
            "nonembedding_params_before": self.nonembedding_params_before,
            "nonembedding_params_after": self.nonembedding_params_after,
            "nonembedding_param_reduction": 1 - self.nonembedding_params_after / self.nonembedding_params_before,
            "ffn_dims": self.ffn_dims,
            "v_head_dims": self.v_head_dims,
            "seconds": self.seconds,
            "timings": self.timings,
        }


class _StopForward(Exception):
    pass


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor,
                          progress: bool) -> tuple[torch.Tensor, dict]:
    """Run the model up to the first decoder layer for every window; keep that layer's inputs and kwargs."""
    store: dict[str, Any] = {}
    inputs: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(hidden.detach().to("cpu", torch.float32))
        if "kwargs" not in store:
            store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in tqdm(range(windows.shape[0]), desc="calibration inputs", disable=not progress, leave=False):
            try:
                model(windows[i : i + 1], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs = store["kwargs"]
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return torch.cat(inputs, 0), kwargs


def _gather_statistics(family: ModelFamily, layer: nn.Module, pairs: list[str], hidden: torch.Tensor, kwargs: dict,
                       device: torch.device, full_gram: bool, holdout: bool, stats: dict, held: dict,
                       write_back: bool = False, relative: bool = False) -> float:
    """Run ``layer`` over every calibration window, folding the inputs of the second Linear of each of ``pairs``
    into ``stats`` (every ``HOLDOUT_EVERY``-th window's into ``held`` first, then added to ``stats``, so that
    ``stats`` holds all windows and ``stats - held`` the fit's); returns the seconds spent folding.
    With ``write_back`` each window's output replaces it in ``hidden`` (the next layer's input). With ``relative``
    each token's input is scaled by ``1 / rms(h)`` of its residual stream ``h`` entering the layer (a float32 Gram,
    for :mod:`.allocation`'s error curves: the pair's output error relative to the stream it is added to)."""
    window, spent, hooks, scale = [0], [0.0], [], [None]

    def make_hook(name: str, dim: int):
        stats[name] = InputStatistics(dim, gram=full_gram, device=device,
                                      chunk_dtype=torch.float32 if relative else torch.float64)
        if holdout:
            held[name] = InputStatistics(dim, gram=True, device=device)

        def hook(module, args):
            t = time.perf_counter()
            held_out = holdout and window[0] % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
            z = args[0] if scale[0] is None else args[0].reshape(-1, dim) * scale[0].reshape(-1, 1).to(args[0].dtype)
            (held if held_out else stats)[name].update(z)  # folded into stats once, after the pass
            spent[0] += time.perf_counter() - t

        return hook

    for name in pairs:
        lin = pair_output(family, layer, name)
        hooks.append(lin.register_forward_pre_hook(make_hook(name, lin.in_features)))
    try:
        for i in range(hidden.shape[0]):
            window[0] = i
            x = hidden[i : i + 1].to(device)
            if relative:
                scale[0] = x.float().square().mean(-1, keepdim=True).clamp_min(1e-12).rsqrt()
            out = layer(x, **kwargs)
            if write_back:
                hidden[i : i + 1] = _layer_output(out).to("cpu")
    finally:
        for h in hooks:
            h.remove()
    for name in held:
        stats[name].add(held[name])
    return spent[0]


def _allocate(family: ModelFamily, layers: nn.ModuleList, targets: tuple[str, ...], hidden: torch.Tensor | None,
              kwargs: dict | None, device: torch.device, reduction: float, params_before: int, rule: str,
              align: int, progress: bool) -> dict[tuple[int, str], int]:
    """Kept counts per ``(layer, pair)`` for ``reduction`` of all parameters (:mod:`.allocation`), from one pass
    of the first :data:`ALLOCATION_WINDOWS` (``error``: :data:`ERROR_CURVE_WINDOWS`) calibration windows through
    the unpruned layers (no data: the weights alone)."""
    from .allocation import allocate, pair_units

    # uniform needs the shapes alone; the others read input norms (error: Gram matrices), which a quarter (an
    # eighth) of the windows pin down
    error = rule == "error"
    windows = ERROR_CURVE_WINDOWS if error else ALLOCATION_WINDOWS
    x = None if hidden is None or rule == "uniform" else hidden[:windows].clone()
    pairs = []
    for idx in tqdm(range(len(layers)), desc="allocation pass", disable=not progress):
        layer = layers[idx]
        home = next(layer.parameters()).device
        layer.to(device)
        norms: dict[str, InputStatistics] = {}
        if x is not None:
            _gather_statistics(family, layer, list(targets), x, kwargs, device, full_gram=error, holdout=False,
                               stats=norms, held={}, write_back=True, relative=error)
        for name in targets:
            pairs.append(pair_units(family, layer, idx, name, norms.get(name), rule, align))
        layer.to(home)
    keep, removed = allocate(pairs, round(reduction * params_before))
    log.info("allocation (%s): %d of %d parameters removed (%.2f%%, asked %.2f%%)", rule, removed, params_before,
             100 * removed / params_before, 100 * reduction)
    return keep


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def prune(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    sparsity: float | None = None,
    param_reduction: float | None = None,
    allocation: str = DEFAULT_ALLOCATION,
    method: str = "fasp",
    calibration: torch.Tensor | None = None,
    targets: Iterable[str] = TARGETS,
    align: int = 1,
    damp: float | str = DEFAULT_DAMP,
    refit_prior: str = DEFAULT_REFIT_PRIOR,
    sequential: bool = False,
    selection: str = DEFAULT_SELECTION,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place with ``method`` and return the smaller model and its figures.

    ``calibration`` is a LongTensor ``[nsamples, seqlen]`` of token ids (see
    :func:`fasp_edge.pipeline.calibration.calibration_windows`); ``magnitude`` needs none.
    ``tokenizer`` is accepted for symmetry with the other entry points and is not used here. ``damp`` and
    ``refit_prior`` shape FASP's refit (module docstring, step 3) and ``selection`` its channel choice (``"auto"``: OBS
    for fasp, the score for the others); the defaults (λ per pair on held-out windows, damped toward the kept
    weights, OBS) beat the earlier ``damp=0.01, refit_prior="zero", selection="score"`` in every comparison measured
    (README, "Quality and pruning cost"), which stays reachable. ``sequential`` prunes each layer's attention
    first and gathers its MLP's statistics in a second pass through the pruned attention (one more forward pass
    over the calibration windows per layer), instead of both from one pass through the unpruned layer.
    Only the layer being pruned sits on ``device``; the rest of the model stays where it is (the CPU).
    """
    del tokenizer
    targets = tuple(t for t in TARGETS if t in set(targets))
    check_prune_arguments(sparsity, method, align, targets, damp, refit_prior, param_reduction, allocation,
                          selection, nsamples=None if calibration is None else calibration.shape[0])
    selection = resolve_selection(selection, method)
    family = family_for(model)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda was given but no CUDA device is available; use --device cpu")
    needs_data = method != "magnitude" and (param_reduction is not None or sparsity > 0)
    if needs_data and calibration is None:
        raise InvalidArgument(f"method {method} needs calibration data (e.g. --calib-file); magnitude needs none")

    start = time.perf_counter()
    timings = {"capture": 0.0, "forward": 0.0, "statistics": 0.0, "solve": 0.0}
    params_before = count_parameters(model)
    emb_before = count_embedding_parameters(family, model)
    layers = family.layers(model)
    restore = method == "fasp"
    full_gram = restore
    holdout = restore and damp == "auto"

    hidden = kwargs = None
    if needs_data:
        t0 = time.perf_counter()
        hidden, kwargs = _capture_layer_inputs(model, layers, calibration.to(torch.long), progress)
        kwargs = _to(kwargs, device)
        timings["capture"] = time.perf_counter() - t0
    keep_counts = None
    if param_reduction is not None:
        t0 = time.perf_counter()
        keep_counts = _allocate(family, layers, targets, hidden, kwargs, device, param_reduction, params_before,
                                allocation, align, progress)
        timings["allocation"] = time.perf_counter() - t0

    decisions: list[LayerDecision] = []
    for idx in tqdm(range(len(layers)), desc=f"{method} layers", disable=not progress):
        layer = layers[idx]
        home = next(layer.parameters()).device
        layer.to(device)
        decision = LayerDecision()
        # one statistics pass for both pairs, or (sequential) attention first, then the MLP's statistics from
        # the layer with its attention already pruned
        groups = [[t] for t in ("attn", "mlp") if t in targets] if sequential else [list(targets)]
        for group in groups:
            stats: dict[str, InputStatistics] = {}
            held: dict[str, InputStatistics] = {}  # damp="auto": the held-out windows' share of stats
            if needs_data:
                t0 = time.perf_counter()
                stat_s = _gather_statistics(family, layer, group, hidden, kwargs, device, full_gram, holdout,
                                            stats, held)
                timings["forward"] += time.perf_counter() - t0 - stat_s
                timings["statistics"] += stat_s
            t0 = time.perf_counter()
            if "attn" in group:
                k = keep_counts[(idx, "attn")] if keep_counts else \
                    keep_count(family.attention_layout(layer).v_head_dim, sparsity, align)
                refit = Refit(damp, refit_prior, held.get("attn"), selection) if restore else None
                kept, decision.attn_damp = prune_attention(family, layer, k, stats.get("attn"), refit)
                decision.attn_keep = kept.cpu()
            if "mlp" in group:
                k = keep_counts[(idx, "mlp")] if keep_counts else keep_count(family.ffn_dim(layer), sparsity, align)
                refit = Refit(damp, refit_prior, held.get("mlp"), selection) if restore else None
                kept, decision.mlp_damp = prune_mlp(family, layer, k, stats.get("mlp"), refit)
                decision.mlp_keep = kept.cpu()
            timings["solve"] += time.perf_counter() - t0
            del stats, held
        decisions.append(decision)

        if needs_data and idx + 1 < len(layers):
            t0 = time.perf_counter()
            for i in range(hidden.shape[0]):
                hidden[i : i + 1] = _layer_output(layer(hidden[i : i + 1].to(device), **kwargs)).to("cpu")
            timings["forward"] += time.perf_counter() - t0
        layer.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    params_after = count_parameters(model)
    emb_after = count_embedding_parameters(family, model)
    return PruneResult(
        model=model,
        method=method,
        sparsity=None if sparsity is None else float(sparsity),
        param_reduction=param_reduction,
        allocation=allocation if param_reduction is not None else None,
        targets=targets,
        align=align,
        damp=damp if damp == "auto" else float(damp),
        refit_prior=refit_prior,
        sequential=sequential,
        selection=selection,
        ffn_dims=family.ffn_dims(model),
        v_head_dims=family.v_head_dims(model),
        decisions=decisions,
        params_before=params_before,
        params_after=params_after,
        nonembedding_params_before=params_before - emb_before,
        nonembedding_params_after=params_after - emb_after,
        seconds=time.perf_counter() - start,
        timings={k: round(v, 3) for k, v in timings.items()},
    )
