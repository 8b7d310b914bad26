"""A parameter budget spread over layers: how many channels each pruned pair keeps for ``--param-reduction R``.

Every pruned pair (a layer's MLP, a layer's value/output projections) offers removable *units*: one FFN channel
(a row of each MLP input Linear and a column of its output Linear), or one value channel in every KV head (a row
of ``v_proj`` per KV head and a column of ``o_proj`` per query head). A unit's parameter cost is known from the
shapes; its value comes from the unpruned model's calibration statistics, gathered in one pass before pruning:

- ``standardized`` (FLAP's rule): the unit's Wanda-style score, standardized within its pair (minus the pair's
  mean, over its standard deviation);
- ``energy``: the share of the pair's output energy the unit carries, ``||W2[:, j]||² · ||Z_j||²`` over the
  pair's sum, per parameter the unit costs: removing the cheapest units first equalizes the estimated relative
  output error per removed parameter across pairs.

- ``error``: the measured reconstruction-error curve of the pair. Greedy OBS removes the pair's units one at a
  time (:func:`~.channels.obs_curve`, on the Gram matrix of the pair's inputs, each token scaled by ``1 / rms`` of the
  residual stream entering the layer, with the damped refit of what is kept), and a unit's value is the rise of
  that relative output error when it goes (made non-decreasing along the removal order), per parameter it
  costs: the threshold then spends the budget where the refit model loses least, relative to the stream each
  pair writes into (a value channel's unit, one channel in every KV head, sums the rises of the next
  ``kv_heads`` removals). Without calibration data (``magnitude``) the Gram matrix is the identity.

- ``uniform``: the unit's rank within its pair over the pair's width, so that every pair loses the same fraction
  of its channels, give or take one unit (``--sparsity``'s meaning, with the fraction found from the budget); needs
  no statistics.

One global threshold over these values, found by bisection, sets every pair's kept count (each rounded to
``align`` as ``--sparsity`` rounds, at least ``align`` or 1 kept) so that the parameters removed come closest to
``R`` times all of the model's parameters (embeddings included). Which units go is then decided pair by pair
during pruning, by the method's own score on the statistics of the already pruned model, as for ``--sparsity``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidArgument
from ..models.base import ModelFamily
from .channels import aligned_width, obs_curve, pair_output, score_channels, value_channel_groups, value_channel_scores
from .options import ALLOCATION_RULES
from .stats import InputStatistics

RULES = ALLOCATION_RULES
CURVE_DAMP = 0.01  # the error rule's refit damping (λ relative to mean(diag G)): one fixed λ for all the curves;
# the final refit then chooses its own per pair (prune's damp="auto")
CURVE_STEPS = 32  # the error rule's greedy removes a pair's units in about this many blocks


@dataclass
class PairUnits:
    """One pair's removable units: their values (lowest go first) and what each costs in parameters."""

    layer: int
    kind: str  # "mlp" or "attn"
    values: torch.Tensor  # [width] float64
    cost: int  # parameters removed per unit
    min_keep: int
    align: int

    @property
    def width(self) -> int:
        return int(self.values.numel())

    def keep_at(self, threshold: float) -> int:
        above = int((self.values >= threshold).sum())
        return aligned_width(max(above, self.min_keep), self.width, self.align)


def _linear_cost(lin: nn.Linear, rows: bool) -> int:
    """Parameters one row (``rows``) or one column of ``lin`` holds, its bias entry included for a row."""
    return (lin.in_features + (lin.bias is not None)) if rows else lin.out_features


def pair_units(family: ModelFamily, layer: nn.Module, index: int, kind: str, stats: InputStatistics | None,
               rule: str, align: int) -> PairUnits:
    """The units of ``layer``'s ``kind`` pair valued by ``rule`` from its output Linear's input ``stats`` (norms;
    the ``error`` rule: the residual-scaled Gram matrix)."""
    out = pair_output(family, layer, kind)
    norms = stats.norms if stats is not None else None
    w = out.weight.detach().to(torch.float64)
    if rule == "standardized":
        per_column = score_channels(out.weight, norms)
    else:
        sq = norms.to(torch.float64).square() if norms is not None else torch.ones(w.shape[1], dtype=torch.float64)
        per_column = w.square().sum(0) * sq
    if kind == "mlp":
        cost = sum(_linear_cost(m, rows=True) for m in family.mlp_in(layer)) + _linear_cost(out, rows=False)
        units = per_column
    else:
        layout = family.attention_layout(layer)
        per_channel = value_channel_scores(per_column, layout)  # [kv_heads, v_dim]
        # unit r removes the r-th weakest channel of every KV head: valued by their sum
        units = torch.sort(per_channel, dim=1).values.sum(0)
        cost = layout.num_kv_heads * _linear_cost(family.attn_in(layer), rows=True) + \
            layout.num_heads * _linear_cost(out, rows=False)
    if rule == "error":
        values = _error_values(family, layer, kind, out, stats, units.numel(), align) / cost
    elif rule == "uniform":
        # a tiny per-pair offset lets the threshold stop between pairs of one width, so the budget is met to one
        # (aligned) unit of one pair rather than of all of them at once
        values = (torch.arange(units.numel(), dtype=torch.float64) + 1) / units.numel() + \
            1e-9 * (2 * index + (kind == "attn"))
    elif rule == "standardized":
        std = units.std()
        values = (units - units.mean()) / (std if std > 0 else 1.0)
    else:
        total = units.sum()
        values = units / (total if total > 0 else 1.0) / cost
    return PairUnits(index, kind, values, int(cost), max(1, min(align, units.numel())), align)


def _error_values(family: ModelFamily, layer: nn.Module, kind: str, out: nn.Linear, stats: InputStatistics,
                  width: int, align: int) -> torch.Tensor:
    """The ``error`` rule's rise per unit (``[width]``, removal order ascending; the units never removed: +inf)."""
    min_keep = max(1, min(align, width))
    if kind == "mlp":
        groups, per_unit = torch.arange(width).unsqueeze(1), 1
    else:
        layout = family.attention_layout(layer)
        (groups, _), per_unit = value_channel_groups(layout), layout.num_kv_heads
    removals = (width - min_keep) * per_unit
    gram = stats.gram if stats is not None else torch.eye(out.in_features, dtype=torch.float64)  # no data: weights
    _, steps = obs_curve(out.weight, gram.to(out.weight.device), groups.to(out.weight.device), removals, CURVE_DAMP,
                         block=per_unit * max(1, -(-removals // (per_unit * CURVE_STEPS))))
    rises = torch.cummax(steps.view(-1, per_unit).sum(1), 0).values
    return torch.cat([rises, torch.full((min_keep,), math.inf, dtype=torch.float64)])


def removed_params(pairs: list[PairUnits], threshold: float) -> int:
    return sum(p.cost * (p.width - p.keep_at(threshold)) for p in pairs)


def allocate(pairs: list[PairUnits], target: int) -> tuple[dict[tuple[int, str], int], int]:
    """Kept counts per ``(layer, kind)`` whose removed parameters come closest to ``target``, and that count."""
    most = sum(p.cost * (p.width - aligned_width(p.min_keep, p.width, p.align)) for p in pairs)
    if target > most:
        raise InvalidArgument(f"--param-reduction asks to remove {target:,} parameters, but the pruned pairs hold "
                              f"only {most:,} removable ones; lower it (or prune more --targets)")
    candidates = torch.unique(torch.cat([p.values for p in pairs])).tolist()  # ascending
    lo, hi = 0, len(candidates) - 1  # removed(candidates[i]) grows with i
    while lo < hi:
        mid = (lo + hi) // 2
        if removed_params(pairs, candidates[mid]) < target:
            lo = mid + 1
        else:
            hi = mid
    best = min((i for i in (lo - 1, lo, lo + 1) if 0 <= i < len(candidates)),
               key=lambda i: abs(removed_params(pairs, candidates[i]) - target))
    t = candidates[best]
    return {(p.layer, p.kind): p.keep_at(t) for p in pairs}, removed_params(pairs, t)
