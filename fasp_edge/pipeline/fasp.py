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
   ``HOLDOUT_EVERY``-th calibration window, held out of the fit (the chosen λ is then refit on all windows),
   walking the grid downhill from the λ the previous pair of its kind chose (:func:`~.channels.choose_damp`);
4. ``W1``'s dead rows (and bias entries) and ``W2``'s dropped columns are physically removed;
5. a second pass runs the pruned layer to produce the next layer's inputs.

``magnitude`` scores by ``Σ_i |W2[i, j]|`` alone and needs no data; ``wanda-sp`` uses the FASP score
without step 3. ``--sparsity`` keeps the same fraction of every pair; ``--param-reduction`` sets each pair's kept
width from a global budget first (:mod:`.allocation`). ``sequential`` statistics prune a layer's attention before
gathering its MLP's statistics.
"""

from __future__ import annotations

import json
import logging
import os
import math
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints.loading import sentencepiece_file
from ..checkpoints.pruned import fasp_section, save_pruned
from ..errors import InvalidArgument
from ..fsutil import state_dict_sha256
from ..models import count_embedding_parameters, count_parameters, family_for
from ..models.base import ModelFamily
from .allocation import RULES, allocate, pair_units
from .channels import HOLDOUT_EVERY, LayerDecision, Refit, keep_count, pair_output, prune_attention, prune_mlp
from .options import (DEFAULT_ALLOCATION, DEFAULT_DAMP, DEFAULT_REFIT_PRIOR, DEFAULT_SELECTION, METHODS, REFIT_PRIORS,
                      SELECTIONS, TARGETS)
from .resume import Progress, fingerprint
from .stats import InputStatistics

log = logging.getLogger(__name__)

ALLOCATION_WINDOWS = 32  # --param-reduction values channels by input norms over the first 32 calibration windows
ERROR_CURVE_WINDOWS = 16  # --allocation error values channels by error curves from the first 16 windows' Gram matrices


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def check_prune_arguments(sparsity: float | None, method: str, align: int, targets: Iterable[str],
                          damp: float | str, refit_prior: str = DEFAULT_REFIT_PRIOR,
                          param_reduction: float | None = None, allocation: str = DEFAULT_ALLOCATION,
                          selection: str = DEFAULT_SELECTION, nsamples: int | None = None) -> None:
    """Raise :class:`InvalidArgument` for any setting outside its range (before any work starts); ``nsamples``, the
    calibration windows to come, when known."""
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
    damp_solves: int = 0  # damp="auto": λ measured in all (one least-squares solve each)
    resumed_layers: int = 0  # layers restored from a resume folder's saved progress rather than pruned by this run
    layer_seconds: list[float] = field(default_factory=list)  # each layer's prune (and propagation) wall seconds

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
                                "attn": [d.attn_damp for d in self.decisions]},
                "damp_solves": self.damp_solves} if self.damp == "auto" else {}),
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
            "layer_seconds": self.layer_seconds,
            **({"resumed_layers": self.resumed_layers} if self.resumed_layers else {}),
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
              align: int, progress: bool, saved: Progress | None = None) -> dict[tuple[int, str], int]:
    """Kept counts per ``(layer, pair)`` for ``reduction`` of all parameters (:mod:`.allocation`), from one pass
    of the first :data:`ALLOCATION_WINDOWS` (``error``: :data:`ERROR_CURVE_WINDOWS`) calibration windows through
    the unpruned layers (no data: the weights alone). With ``saved`` the pass saves its progress after every layer
    and continues from what is saved."""
    # uniform needs the shapes alone; the others read input norms (error: Gram matrices), which a quarter (an
    # eighth) of the windows pin down
    error = rule == "error"
    windows = ERROR_CURVE_WINDOWS if error else ALLOCATION_WINDOWS
    x = None if hidden is None or rule == "uniform" else hidden[:windows].clone()
    t0 = time.perf_counter()
    pairs = saved.allocation_pass(x) if saved else []
    first = len({p.layer for p in pairs})
    for idx in tqdm(range(first, len(layers)), desc="allocation pass", disable=not progress, initial=first,
                    total=len(layers)):
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
        if saved and idx + 1 < len(layers):
            saved.save_allocation_pass(pairs, x, time.perf_counter() - t0)
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
    resume_dir: str | os.PathLike | None = None,
    model_sha256: str | None = None,
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
    With ``resume_dir`` the run saves its progress there after the allocation and after every layer, and a run
    with the same model, calibration and settings continues from it (:mod:`.resume`; ``model_sha256``, the
    model's :func:`~fasp_edge.fsutil.state_dict_sha256` if the caller has it, saves hashing it again).
    """
    del tokenizer
    run = _settings(model, sparsity=sparsity, param_reduction=param_reduction, allocation=allocation, method=method,
                    calibration=calibration, targets=targets, align=align, damp=damp, refit_prior=refit_prior,
                    sequential=sequential, selection=selection, device=device)
    start = time.perf_counter()
    family, layers = run.family, run.family.layers(model)
    params_before = count_parameters(model)
    emb_before = count_embedding_parameters(family, model)
    saved = None
    if resume_dir is not None:
        saved = Progress(resume_dir, fingerprint(run.fingerprint_settings(), calibration,
                                                 model_sha256 or state_dict_sha256(model)))
    hidden = kwargs = None
    if run.needs_data:  # capture: the first layer's inputs for every calibration window
        t0 = time.perf_counter()
        hidden, kwargs = _capture_layer_inputs(model, layers, calibration.to(torch.long), progress)
        kwargs = _to(kwargs, run.device)
        run.timings["capture"] = time.perf_counter() - t0
    if param_reduction is not None:  # decide every pair's kept width from the global budget first
        run.keep_counts = saved.allocation() if saved else None
        if run.keep_counts is None:
            t0 = time.perf_counter()
            run.keep_counts = _allocate(family, layers, run.targets, hidden, kwargs, run.device, param_reduction,
                                        params_before, allocation, align, progress, saved)
            run.timings["allocation"] = time.perf_counter() - t0 + (saved.allocation_before if saved else 0.0)
            if saved:
                saved.save_allocation(run.keep_counts, run.timings["allocation"])
        else:
            run.timings["allocation"] = saved.state["allocation_seconds"]

    decisions: list[LayerDecision] = []
    resumed = 0
    if saved and saved.layers_done:
        decisions, state = saved.restore(family, layers, hidden)
        run.restore_state(state)
        resumed = len(decisions)
        log.info("continuing the prune saved in %s after layer %d of %d", resume_dir, saved.layers_done, len(layers))
    for idx in tqdm(range(len(decisions), len(layers)), desc=f"{method} layers", disable=not progress,
                    initial=len(decisions), total=len(layers)):
        layer = layers[idx]
        t0 = time.perf_counter()
        home = next(layer.parameters()).device
        layer.to(run.device)
        decisions.append(_prune_layer(run, idx, layer, hidden, kwargs))
        if run.needs_data and idx + 1 < len(layers):
            _propagate(run, layer, hidden, kwargs)
        layer.to(home)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        run.layer_seconds.append(round(time.perf_counter() - t0, 3))
        if saved:
            saved.save_layer(idx, layer, decisions[-1], hidden if idx + 1 < len(layers) else None, run.saved_state())
    seconds = saved.elapsed() if saved else time.perf_counter() - start  # with saved progress: every run's
    result = _result(run, model, decisions, params_before, emb_before, seconds)
    result.resumed_layers = resumed
    return result


@dataclass
class _Settings:
    """One pruning run's checked settings, and what it accumulates (timings, the allocation's kept counts)."""

    family: ModelFamily
    method: str
    targets: tuple[str, ...]
    sparsity: float | None
    param_reduction: float | None
    allocation: str
    align: int
    damp: float | str
    refit_prior: str
    sequential: bool
    selection: str
    device: torch.device
    needs_data: bool
    timings: dict[str, float] = field(default_factory=lambda: {"capture": 0.0, "forward": 0.0, "statistics": 0.0,
                                                               "solve": 0.0})
    keep_counts: dict[tuple[int, str], int] | None = None
    damp_start: dict[str, float] = field(default_factory=dict)  # damp="auto": the last λ chosen per kind of pair
    damp_solves: int = 0  # damp="auto": λ measured over the run (one least-squares solve each)
    layer_seconds: list[float] = field(default_factory=list)  # the layer loop's wall seconds, a layer each

    @property
    def restore(self) -> bool:  # FASP refits the kept columns (and so needs the full Gram matrices)
        return self.method == "fasp"

    @property
    def holdout(self) -> bool:  # damp="auto" measures each λ on held-out windows
        return self.restore and self.damp == "auto"

    def fingerprint_settings(self) -> dict:
        """What decides the pruned weights, for :func:`.resume.fingerprint`."""
        return {"method": self.method, "targets": list(self.targets), "sparsity": self.sparsity,
                "param_reduction": self.param_reduction, "allocation": self.allocation, "align": self.align,
                "damp": self.damp, "refit_prior": self.refit_prior, "sequential": self.sequential,
                "selection": self.selection}

    def saved_state(self) -> dict:
        """What the layer loop carries from one layer to the next besides the weights (for :mod:`.resume`)."""
        return {"timings": dict(self.timings), "damp_start": dict(self.damp_start), "damp_solves": self.damp_solves,
                "layer_seconds": list(self.layer_seconds)}

    def restore_state(self, state: dict) -> None:
        """Continue from :meth:`saved_state`: the earlier runs' stage seconds add to this run's (the allocation's
        are already in, from the saved allocation or this run's)."""
        for k, v in state.get("timings", {}).items():
            if k != "allocation":
                self.timings[k] = self.timings.get(k, 0.0) + v
        self.damp_start.update(state.get("damp_start", {}))
        self.damp_solves = int(state.get("damp_solves", 0))
        self.layer_seconds = list(state.get("layer_seconds", []))


def _settings(model: nn.Module, *, sparsity, param_reduction, allocation, method, calibration, targets, align, damp,
              refit_prior, sequential, selection, device) -> _Settings:
    """Check every argument (before any work) and resolve the defaults that depend on others."""
    targets = tuple(t for t in TARGETS if t in set(targets))
    check_prune_arguments(sparsity, method, align, targets, damp, refit_prior, param_reduction, allocation,
                          selection, nsamples=None if calibration is None else calibration.shape[0])
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda was given but no CUDA device is available; use --device cpu")
    needs_data = method != "magnitude" and (param_reduction is not None or sparsity > 0)
    if needs_data and calibration is None:
        raise InvalidArgument(f"method {method} needs calibration data (e.g. --calib-file); magnitude needs none")
    return _Settings(family_for(model), method, targets, sparsity, param_reduction, allocation, align, damp,
                     refit_prior, sequential, resolve_selection(selection, method), device, needs_data)


def _prune_layer(run: _Settings, idx: int, layer: nn.Module, hidden: torch.Tensor | None,
                 kwargs: dict | None) -> LayerDecision:
    """Collect one layer's input statistics, decide each pair's kept channels and apply the cut (and refit)."""
    family, decision = run.family, LayerDecision()
    # one statistics pass for both pairs, or (sequential) attention first, then the MLP's statistics from
    # the layer with its attention already pruned
    groups = [[t] for t in ("attn", "mlp") if t in run.targets] if run.sequential else [list(run.targets)]
    for group in groups:
        stats: dict[str, InputStatistics] = {}
        held: dict[str, InputStatistics] = {}  # damp="auto": the held-out windows' share of stats
        if run.needs_data:
            t0 = time.perf_counter()
            stat_s = _gather_statistics(family, layer, group, hidden, kwargs, run.device, run.restore, run.holdout,
                                        stats, held)
            run.timings["forward"] += time.perf_counter() - t0 - stat_s
            run.timings["statistics"] += stat_s
        t0 = time.perf_counter()
        if "attn" in group:
            k = run.keep_counts[(idx, "attn")] if run.keep_counts else \
                keep_count(family.attention_layout(layer).v_head_dim, run.sparsity, run.align)
            refit = Refit(run.damp, run.refit_prior, held.get("attn"), run.selection,
                          run.damp_start.get("attn")) if run.restore else None
            kept, decision.attn_damp = prune_attention(family, layer, k, stats.get("attn"), refit)
            _note_damp(run, "attn", refit)
            decision.attn_keep = kept.cpu()
        if "mlp" in group:
            k = run.keep_counts[(idx, "mlp")] if run.keep_counts else \
                keep_count(family.ffn_dim(layer), run.sparsity, run.align)
            refit = Refit(run.damp, run.refit_prior, held.get("mlp"), run.selection,
                          run.damp_start.get("mlp")) if run.restore else None
            kept, decision.mlp_damp = prune_mlp(family, layer, k, stats.get("mlp"), refit)
            _note_damp(run, "mlp", refit)
            decision.mlp_keep = kept.cpu()
        run.timings["solve"] += time.perf_counter() - t0
        del stats, held
    return decision


def _note_damp(run: _Settings, kind: str, refit: Refit | None) -> None:
    """Keep what a pair's λ search found for the next pair of its kind to start from, and count its solves."""
    if refit is not None and refit.damp == "auto":
        run.damp_solves += refit.solves
        if refit.start is not None:
            run.damp_start[kind] = refit.start


def _propagate(run: _Settings, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> None:
    """Run the pruned layer over every window: its outputs replace ``hidden`` as the next layer's inputs."""
    t0 = time.perf_counter()
    for i in range(hidden.shape[0]):
        hidden[i : i + 1] = _layer_output(layer(hidden[i : i + 1].to(run.device), **kwargs)).to("cpu")
    run.timings["forward"] += time.perf_counter() - t0


def _result(run: _Settings, model: nn.Module, decisions: list[LayerDecision], params_before: int, emb_before: int,
            seconds: float) -> PruneResult:
    family = run.family
    params_after = count_parameters(model)
    emb_after = count_embedding_parameters(family, model)
    return PruneResult(
        model=model,
        method=run.method,
        sparsity=None if run.sparsity is None else float(run.sparsity),
        param_reduction=run.param_reduction,
        allocation=run.allocation if run.param_reduction is not None else None,
        targets=run.targets,
        align=run.align,
        damp=run.damp if run.damp == "auto" else float(run.damp),
        refit_prior=run.refit_prior,
        sequential=run.sequential,
        selection=run.selection,
        ffn_dims=family.ffn_dims(model),
        v_head_dims=family.v_head_dims(model),
        decisions=decisions,
        params_before=params_before,
        params_after=params_after,
        nonembedding_params_before=params_before - emb_before,
        nonembedding_params_after=params_after - emb_after,
        seconds=seconds,
        timings={k: round(v, 3) for k, v in run.timings.items()},
        damp_solves=run.damp_solves,
        layer_seconds=list(run.layer_seconds),
    )


def prune_checkpoint(loaded, out: str | os.PathLike, *, sparsity: float | None, method: str, targets: list[str], align: int,
                     damp: float | str, device: str, calibration: torch.Tensor | None,
                     calibration_description: dict | None, overwrite: bool = True, progress: bool = True,
                     load_seconds: float | None = None, refit_prior: str = DEFAULT_REFIT_PRIOR,
                     sequential: bool = False, param_reduction: float | None = None,
                     allocation: str = DEFAULT_ALLOCATION, selection: str = DEFAULT_SELECTION,
                     resume_dir: str | os.PathLike | None = None) -> dict:
    """Prune ``loaded`` (in place) and save it as a checkpoint at ``out`` with its ``fasp_report.json``: what
    ``fasp-edge prune`` and ``fasp-edge run``'s prune stage do once the model and its calibration windows are
    loaded. With ``resume_dir`` the prune saves its progress there (and continues from what is there); the folder
    is removed once the checkpoint is written."""
    source_hash = state_dict_sha256(loaded.model)
    calib_desc = calibration_description or {"none": "magnitude needs no data"}
    result = prune(loaded.model, loaded.tokenizer, sparsity=sparsity, param_reduction=param_reduction,
                   allocation=allocation, method=method, calibration=calibration,
                   targets=targets, align=align, damp=damp, refit_prior=refit_prior, sequential=sequential,
                   selection=selection, device=device, progress=progress, resume_dir=resume_dir,
                   model_sha256=source_hash)
    report = {"source_model": loaded.source, "source_sha256": source_hash, "calibration": calib_desc,
              **({"load_seconds": round(load_seconds, 3)} if load_seconds is not None else {}), **result.report()}
    section = fasp_section(loaded.model, method=method, sparsity=sparsity, extra={
        "targets": list(result.targets), "align": align, "damp": damp,
        **({"refit_prior": refit_prior, "selection": result.selection} if method == "fasp" else {}),
        **({"sequential_statistics": True} if sequential else {}),
        **({"param_reduction": param_reduction, "allocation": allocation} if param_reduction is not None else {}),
        "calibration": calib_desc,
        "source_model": {"name": loaded.source, "sha256": source_hash},
    })
    spm = sentencepiece_file(loaded)
    save_pruned(loaded.model, loaded.tokenizer, out, section, overwrite=overwrite,
                extra_files={"fasp_report.json": json.dumps(report, indent=2) + "\n"},
                copy_files={"tokenizer.model": spm} if spm else None)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)
    return report
