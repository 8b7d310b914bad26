"""The channel-level arithmetic of structured pruning, shared by FASP's layer loop (:mod:`.fasp`) and the
parameter-budget allocation (:mod:`.allocation`): kept widths and their alignment, the Wanda-style channel scores
(GQA value channels included), OBS selection and error curves, the damped least-squares refit of ``W2``'s kept
columns with its held-out choice of λ, and the physical removal of a pair's channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.base import AttentionLayout, ModelFamily, empty_linear
from .stats import InputStatistics

DAMP_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
HOLDOUT_EVERY = 4  # damp="auto": windows 3, 7, 11, ... measure each candidate λ, the others fit it


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
    a = g_mm.clone()
    a.diagonal().add_(reg)  # G + reg·I without a d x d identity (its allocation and product cost as much as a solve)
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
                prior: str, start: float | None = None, errors: dict[float, float] | None = None) -> float:
    """The λ of :data:`DAMP_GRID` whose refit on ``fit_gram`` best reconstructs the held-out tokens' output.

    The grid is walked downhill from ``start`` (the nearest grid point; default the grid's middle): the neighbours of
    the current λ are measured and the walk moves to the better one until neither is better. Where the held-out
    error is unimodal along the grid (it falls, then rises, as ridge's bias trades against its variance) that is
    the grid's best, found with 3-5 solves instead of 10: each solve factors the kept Gram block, 12 s at a 1.5B
    model's FFN width on 2 cores (benchmarks/obs_select.py). Ties keep the smaller λ, as a full scan's ``min`` did.
    Every λ measured lands in ``errors`` when it is given.
    """
    g = fit_gram.to(torch.float64)
    w = w2.detach().to(g)
    g_mm, base, w_keep = g[keep][:, keep], w @ g[:, keep], w[:, keep]  # shared by every λ
    error = _refit_error_fn(w2, held_gram, keep)
    seen: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in seen:
            seen[i] = error(_damped_solve(g_mm, base, w_keep, DAMP_GRID[i], prior))
        return seen[i]

    n = len(DAMP_GRID)
    i = n // 2 if start is None else min(range(n), key=lambda j: abs(math.log(DAMP_GRID[j] / start)))
    while True:
        best = min((j for j in (i - 1, i, i + 1) if 0 <= j < n), key=lambda j: (at(j), j))
        if best == i:
            break
        i = best
    if errors is not None:
        errors.update({DAMP_GRID[j]: e for j, e in sorted(seen.items())})
    return DAMP_GRID[i]


def _obs_start(w2: torch.Tensor, gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS's starting state: a float64 copy of ``W2`` and ``H⁻¹``, ``H = G + λ'I``, ``λ' = damp·mean(diag G)``."""
    g = gram.to(torch.float64)
    reg = max(damp, 1e-6) * torch.diagonal(g).mean().clamp_min(1e-12)
    h = g.clone()
    h.diagonal().add_(reg)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    # cholesky_solve(I) rather than cholesky_inverse: the same H⁻¹ (to rounding), several times faster on a CPU
    # at the widths of 0.5B-1.5B models (benchmarks/obs_select.py times both)
    return w2.detach().to(g).clone(), torch.cholesky_solve(eye, torch.linalg.cholesky(h))


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
    if groups.shape[1] == 1:
        return _obs_select_columns(w, hinv, groups[:, 0], alive, open_, buckets, left)
    for _ in range(sum(left)):
        err = _obs_errors(w, hinv, groups)
        best = int(torch.argmin(torch.where(open_, err, torch.full_like(err, math.inf))))
        s = groups[best]
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


#: one-column greedy OBS applies its rank-1 updates of W2 and H⁻¹ in blocks of this many removals
OBS_DEFER = 64


def _obs_select_columns(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor, alive: torch.Tensor,
                        open_: torch.Tensor, buckets: torch.Tensor, left: list[int]) -> torch.Tensor:
    """:func:`obs_select` where every unit is one column (an FFN channel), with the same greedy choices.

    Removing column ``j`` updates ``W ← W − (W[:, j]/p) rᵀ`` and ``H⁻¹ ← H⁻¹ − r rᵀ/p`` (``r = H⁻¹[j]``,
    ``p = H⁻¹[j, j]``). Done at every step, that streams all of ``H⁻¹`` (d² floats: 640 MB at a 1.5B model's FFN
    width of 8960) twice per removed channel. Here the updates wait, up to :data:`OBS_DEFER` of them, and are
    applied as two matrix products; in between, what the next choice needs is kept exactly: the diagonal of
    ``H⁻¹`` and the squared column norms of ``W`` by their rank-1 recurrences, and the pivot's row and column
    from the pending updates.
    """
    diag = torch.diagonal(hinv).clone()
    norms = w.square().sum(0)
    # pending updates, filled row by row: H⁻¹ rows / √pivot (d) and W columns · √pivot / pivot (out)
    r_buf = hinv.new_empty(OBS_DEFER, hinv.shape[0])
    c_buf = w.new_empty(OBS_DEFER, w.shape[0])
    t, block = 0, []  # pending updates, and the columns they remove
    inf = torch.full((len(cols),), math.inf, dtype=norms.dtype, device=norms.device)
    for _ in range(sum(left)):
        err = norms[cols] / diag[cols]
        best = int(torch.argmin(torch.where(open_, err, inf)))
        j = int(cols[best])
        r_mat, c_mat = r_buf[:t], c_buf[:t]
        coef = r_mat[:, j]
        row = hinv[j] - coef @ r_mat
        wcol = w[:, j] - coef @ c_mat
        pivot = row[j]
        c = wcol / pivot
        # ‖W[:, k] − c r_k‖² = ‖W[:, k]‖² − 2 r_k (cᵀW[:, k]) + r_k² ‖c‖², cᵀW read through the pending updates
        cw = c @ w - (c_mat @ c) @ r_mat
        norms += row * (row * c.square().sum() - 2 * cw)
        diag -= row.square() / pivot
        r_buf[t] = row / pivot.sqrt()  # so that H⁻¹ ← H⁻¹ − Σ r rᵀ and W ← W − Σ (c √p) (r/√p)ᵀ
        c_buf[t] = c * pivot.sqrt()
        t += 1
        block.append(j)
        norms[j], diag[j] = 0.0, 1.0  # removed: a zero column and a unit diagonal, as obs_select leaves them
        alive[best] = open_[best] = False
        b = int(buckets[best])
        left[b] -= 1
        if left[b] == 0:
            open_[buckets == b] = False
        if t == OBS_DEFER:
            _obs_flush(w, hinv, r_buf, c_buf, torch.tensor(block, device=cols.device), diag, norms)
            t, block = 0, []
    return alive


def _obs_flush(w: torch.Tensor, hinv: torch.Tensor, r_mat: torch.Tensor, c_mat: torch.Tensor,
               removed: torch.Tensor, diag: torch.Tensor, norms: torch.Tensor) -> None:
    """Apply the pending rank-1 updates of :func:`_obs_select_columns` and refresh its running diagonal and norms
    from the updated matrices (so that rounding in the recurrences never accumulates past one block).

    Only the columns this block removed (``removed``) are cleaned to exact zeros (a unit diagonal in ``H⁻¹``):
    a column removed in an earlier block is exactly zero in ``H⁻¹`` and ``W``, so every later update row is
    exactly zero there too and leaves it as it is (rewriting all removed columns of the d x d ``H⁻¹`` at every
    flush cost more than the update itself at a 1.5B model's width)."""
    hinv.addmm_(r_mat.T, r_mat, alpha=-1)
    w.addmm_(c_mat.T, r_mat, alpha=-1)
    w[:, removed] = 0
    hinv[removed] = 0
    hinv[:, removed] = 0
    hinv[removed, removed] = 1.0
    diag.copy_(torch.diagonal(hinv))
    norms.copy_(w.square().sum(0))


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
    start: float | None = None  # damp="auto": where the λ search starts (the last λ chosen for this kind of pair)
    solves: int = 0  # damp="auto": λ measured so far (one solve each)

    def _damp(self, w2: torch.Tensor, stats: InputStatistics, keep: torch.Tensor) -> float:
        if self.damp == "auto":
            measured: dict[float, float] = {}
            self.start = choose_damp(w2, stats.gram - self.held.gram, self.held.gram, keep, self.prior, self.start,
                                     measured)
            self.solves += len(measured)
            return self.start
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
    cut_mlp(family, layer, keep, new_w)
    return keep, damp


def cut_mlp(family: ModelFamily, layer: nn.Module, keep: torch.Tensor, new_w: torch.Tensor | None = None) -> None:
    """Keep only the FFN channels ``keep`` of the layer's MLP (``W2``'s kept columns replaced by ``new_w`` if given)."""
    keep = keep.to(family.mlp_out(layer).weight.device)
    family.set_mlp(layer, [_take_rows(m, keep) for m in family.mlp_in(layer)],
                   _take_columns(family.mlp_out(layer), keep, new_w))


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
    _, o_cols = attention_columns(kept, layout)
    new_w, damp = refit.weights(o.weight, stats, o_cols.to(o.weight.device)) if refit else (None, None)
    cut_attention(family, layer, kept, new_w)
    return kept, damp


def cut_attention(family: ModelFamily, layer: nn.Module, kept: torch.Tensor, new_w: torch.Tensor | None = None) -> None:
    """Keep only the value channels ``kept`` (``[kv_heads, k]``) of the layer's attention (``o_proj``'s kept
    columns replaced by ``new_w`` if given)."""
    o = family.attn_out(layer)
    v_rows, o_cols = (t.to(o.weight.device) for t in attention_columns(kept, family.attention_layout(layer)))
    family.set_attn(layer, _take_rows(family.attn_in(layer), v_rows), _take_columns(o, o_cols, new_w), kept.shape[1])


# --------------------------------------------------------------------------------------------------
# the layer-sequential driver
# --------------------------------------------------------------------------------------------------
