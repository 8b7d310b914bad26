"""FASP (Hu et al., 2025) and the baselines that share its structure.

For each decoder layer in order, with calibration activations propagated through the already pruned
layers before it:

1. one pass over the calibration windows gathers, for each pruned pair ``y = W2 · f(W1 · x)``, the
   float64 Gram matrix ``G = Z Zᵀ`` of ``W2``'s input ``Z``;
2. channels are scored with ``score_j = ||Z_j||₂ · Σ_i |W2[i, j]|`` (summed over the query heads that
   share a value channel under GQA) and the top ``k`` are kept (the same ``k`` in every KV head);
3. the kept columns of ``W2`` are refit by damped least squares,
   ``W2'[:, M] = W2 · G[:, M] · (G[M, M] + λ·mean(diag G[M, M])·I)⁻¹``;
4. ``W1``'s dead rows (and bias entries) and ``W2``'s dropped columns are physically removed;
5. a second pass runs the pruned layer to produce the next layer's inputs.

``magnitude`` scores by ``Σ_i |W2[i, j]|`` alone and needs no data; ``wanda-sp`` uses the FASP score
without step 3.
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


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def check_prune_arguments(sparsity: float, method: str, align: int, targets: Iterable[str], damp: float) -> None:
    """Raise :class:`InvalidArgument` for any setting outside its range (before any work starts)."""
    if not (isinstance(sparsity, (int, float)) and math.isfinite(sparsity) and 0 <= sparsity < 1):
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
    if not (math.isfinite(damp) and damp >= 0):
        raise InvalidArgument(f"--damp must be a finite number >= 0, got {damp}")


def keep_count(width: int, sparsity: float, align: int = 1) -> int:
    """How many of ``width`` channels survive: ``width - floor(sparsity · width)``, rounded to ``align``.

    Alignment rounds to the nearest multiple of ``align`` (halves up; at least ``align``, at most ``width``) and is
    skipped where nothing is removed or where ``width`` itself is smaller than ``align``.
    """
    keep = width - int(math.floor(sparsity * width + 1e-9))
    if keep == width or align <= 1 or width < align:
        return keep
    return int(min(width, max(align, align * math.floor(keep / align + 0.5))))


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


def restore_columns(w2: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """Least-squares refit of the kept columns of ``W2`` (returned as ``[out, len(keep)]`` in float64).

    Solves ``min_X ||W2 Z − X Z_M||² + λ·mean(diag G_MM)·||X||²`` in closed form,
    ``X = W2 G[:, M] (G[M, M] + λ·mean(diag G[M, M]) I)⁻¹``.
    """
    g = gram.to(torch.float64)
    g_mm = g[keep][:, keep]
    reg = damp * torch.diagonal(g_mm).mean()
    a = g_mm + reg * torch.eye(len(keep), dtype=g.dtype, device=g.device)
    rhs = (w2.detach().to(g) @ g[:, keep]).T  # [k, out]
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(rhs, chol)
    else:  # singular even after damping (e.g. dead channels with damp=0): minimum-norm solution
        x = torch.linalg.lstsq(a, rhs, driver="gelsd" if a.device.type == "cpu" else None).solution
    return x.T


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


def prune_mlp(family: ModelFamily, layer: nn.Module, keep_k: int, stats: InputStatistics | None,
              restore: bool, damp: float) -> torch.Tensor:
    w2 = family.mlp_out(layer)
    scores = score_channels(w2.weight, stats.norms if stats is not None else None)
    keep = top_channels(scores, keep_k).to(w2.weight.device)
    if keep_k == w2.in_features:
        return keep
    new_w = None
    if restore:
        new_w = restore_columns(w2.weight, stats.gram, keep, damp).to(w2.weight.dtype)
    family.set_mlp(layer, [_take_rows(m, keep) for m in family.mlp_in(layer)], _take_columns(w2, keep, new_w))
    return keep


def prune_attention(family: ModelFamily, layer: nn.Module, keep_k: int, stats: InputStatistics | None,
                    restore: bool, damp: float) -> torch.Tensor:
    layout = family.attention_layout(layer)
    o = family.attn_out(layer)
    scores = score_channels(o.weight, stats.norms if stats is not None else None)
    kept = top_channels(value_channel_scores(scores, layout), keep_k)
    if keep_k == layout.v_head_dim:
        return kept
    v_rows, o_cols = (t.to(o.weight.device) for t in attention_columns(kept, layout))
    new_w = None
    if restore:
        new_w = restore_columns(o.weight, stats.gram, o_cols, damp).to(o.weight.dtype)
    family.set_attn(layer, _take_rows(family.attn_in(layer), v_rows), _take_columns(o, o_cols, new_w), keep_k)
    return kept


# --------------------------------------------------------------------------------------------------
# the layer-sequential driver
# --------------------------------------------------------------------------------------------------
@dataclass
class PruneResult:
    """The pruned model (pruned in place) and what was measured while pruning it."""

    model: nn.Module
    method: str
    sparsity: float
    targets: tuple[str, ...]
    align: int
    damp: float
    ffn_dims: list[int]
    v_head_dims: list[int]
    decisions: list[LayerDecision]
    params_before: int
    params_after: int
    nonembedding_params_before: int
    nonembedding_params_after: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """JSON-ready summary (``fasp_report.json``)."""
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "targets": list(self.targets),
            "align": self.align,
            "damp": self.damp,
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


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def prune(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    sparsity: float,
    method: str = "fasp",
    calibration: torch.Tensor | None = None,
    targets: Iterable[str] = TARGETS,
    align: int = 1,
    damp: float = 0.01,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place with ``method`` and return the smaller model and its figures.

    ``calibration`` is a LongTensor ``[nsamples, seqlen]`` of token ids (see
    :func:`fasp_edge.pipeline.calibration.calibration_windows`); ``magnitude`` needs none.
    ``tokenizer`` is accepted for symmetry with the other entry points and is not used here.
    Only the layer being pruned sits on ``device``; the rest of the model stays where it is (the CPU).
    """
    del tokenizer
    targets = tuple(t for t in TARGETS if t in set(targets))
    check_prune_arguments(sparsity, method, align, targets, damp)
    family = family_for(model)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda was given but no CUDA device is available; use --device cpu")
    needs_data = method != "magnitude" and sparsity > 0
    if needs_data and calibration is None:
        raise InvalidArgument(f"method {method} needs calibration data (e.g. --calib-file); magnitude needs none")

    start = time.perf_counter()
    timings = {"capture": 0.0, "forward": 0.0, "statistics": 0.0, "solve": 0.0}
    params_before = count_parameters(model)
    emb_before = count_embedding_parameters(family, model)
    layers = family.layers(model)
    restore = method == "fasp"
    full_gram = restore

    hidden = kwargs = None
    if needs_data:
        t0 = time.perf_counter()
        hidden, kwargs = _capture_layer_inputs(model, layers, calibration.to(torch.long), progress)
        kwargs = _to(kwargs, device)
        timings["capture"] = time.perf_counter() - t0

    decisions: list[LayerDecision] = []
    for idx in tqdm(range(len(layers)), desc=f"{method} layers", disable=not progress):
        layer = layers[idx]
        home = next(layer.parameters()).device
        layer.to(device)
        stats: dict[str, InputStatistics] = {}
        hooks = []
        if needs_data:
            stat_time = [0.0]

            def make_hook(name: str, dim: int):
                stats[name] = InputStatistics(dim, gram=full_gram, device=device)

                def hook(module, args):
                    t = time.perf_counter()
                    stats[name].update(args[0])
                    stat_time[0] += time.perf_counter() - t

                return hook

            if "attn" in targets:
                o = family.attn_out(layer)
                hooks.append(o.register_forward_pre_hook(make_hook("attn", o.in_features)))
            if "mlp" in targets:
                w2 = family.mlp_out(layer)
                hooks.append(w2.register_forward_pre_hook(make_hook("mlp", w2.in_features)))
            t0 = time.perf_counter()
            try:
                for i in range(hidden.shape[0]):
                    layer(hidden[i : i + 1].to(device), **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            timings["forward"] += time.perf_counter() - t0 - stat_time[0]
            timings["statistics"] += stat_time[0]

        t0 = time.perf_counter()
        decision = LayerDecision()
        if "attn" in targets:
            k = keep_count(family.attention_layout(layer).v_head_dim, sparsity, align)
            decision.attn_keep = prune_attention(family, layer, k, stats.get("attn"), restore, damp).cpu()
        if "mlp" in targets:
            k = keep_count(family.ffn_dim(layer), sparsity, align)
            decision.mlp_keep = prune_mlp(family, layer, k, stats.get("mlp"), restore, damp).cpu()
        timings["solve"] += time.perf_counter() - t0
        decisions.append(decision)
        del stats

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
        sparsity=float(sparsity),
        targets=targets,
        align=align,
        damp=float(damp),
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
