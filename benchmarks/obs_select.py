"""OBS channel selection at a 1.5B model's FFN width: one rank-1 update per removal against deferred blocks.

A random problem of the Qwen2.5-1.5B MLP's shape (``W2`` 1536 x 8960, a Gram matrix from 12000 random tokens,
damping 0.01), 2240 channels removed (25%). The step-by-step greedy (how ``obs_select`` ran before: ``W2`` and the
640 MB ``H⁻¹`` updated after every removal) is timed over its first ``--eager`` removals and extrapolated; the
deferred one (:func:`fasp_edge.pipeline.channels._obs_select_columns`, blocks of ``OBS_DEFER``) over all of them;
both from the same start, in one process. Then one point of the refit's λ search on the kept channels (a Cholesky
factorization of the kept Gram block, the solve, the error), which FASP's ``--damp auto`` repeats for each of the
ten λ of ``DAMP_GRID``, twice per MLP pair, when it scanned the whole grid (it now walks the grid from the last
λ chosen, 3-5 points per search: ``choose_damp``). Writes benchmarks/results/obs-select.{json,md}.

    .venv/bin/python benchmarks/obs_select.py        # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fasp_edge.fsutil import atomic_write_text
from fasp_edge.pipeline import channels

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=8960)
    ap.add_argument("--out", type=int, default=1536)
    ap.add_argument("--removals", type=int, default=2240)
    ap.add_argument("--eager", type=int, default=64, help="removals timed for the step-by-step greedy")
    ap.add_argument("--inverse-width", type=int, default=3072, help="width of the cholesky_inverse comparison")
    args = ap.parse_args()
    torch.manual_seed(0)
    d = args.width
    z = torch.randn(12000, d)
    gram = (z.T @ z).double()
    del z
    w2 = torch.randn(args.out, d)
    t0 = time.perf_counter()
    w, hinv = channels._obs_start(w2, gram, 0.01)
    start_s = time.perf_counter() - t0
    w_lazy, h_lazy = w.clone(), hinv.clone()

    t0 = time.perf_counter()
    alive = torch.ones(d, dtype=torch.bool)
    for _ in range(args.eager):
        err = w.square().sum(0) / torch.diagonal(hinv)
        j = int(torch.argmin(torch.where(alive, err, torch.full_like(err, math.inf))))
        rows, pivot = hinv[j].clone(), hinv[j, j]
        w.addr_(w[:, j] / pivot, rows, alpha=-1)
        hinv.addr_(rows / pivot, rows, alpha=-1)
        w[:, j], hinv[j, j], alive[j] = 0, 1.0, False
    eager_s = time.perf_counter() - t0

    kept = torch.ones(d, dtype=torch.bool)
    t0 = time.perf_counter()
    channels._obs_select_columns(w_lazy, h_lazy, torch.arange(d), kept, kept.clone(), torch.zeros(d, dtype=torch.long),
                                 [args.removals])
    lazy_s = time.perf_counter() - t0
    same = set((~alive).nonzero().squeeze(1).tolist()) <= set((~kept).nonzero().squeeze(1).tolist())

    # one point of the refit's λ search on the kept block (a full scan of the grid: ten of them per search)
    keep = kept.nonzero().squeeze(1)
    w64 = w2.double()
    g_mm, base, w_keep = gram[keep][:, keep], w64 @ gram[:, keep], w64[:, keep]
    error = channels._refit_error_fn(w2, gram, keep)
    t0 = time.perf_counter()
    x = channels._damped_solve(g_mm, base, w_keep, 0.1, "original")
    solve_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    error(x)
    error_s = time.perf_counter() - t0
    # H⁻¹ two ways, on a smaller random SPD matrix (cholesky_inverse at the full width takes minutes)
    small = torch.randn(2 * args.inverse_width, args.inverse_width, dtype=torch.float64)
    h = small.T @ small
    h.diagonal().add_(0.01 * h.diagonal().mean())
    chol = torch.linalg.cholesky(h)
    t0 = time.perf_counter()
    by_inverse = torch.cholesky_inverse(chol)
    inverse_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    by_solve = torch.cholesky_solve(torch.eye(args.inverse_width, dtype=torch.float64), chol)
    solve_i_s = time.perf_counter() - t0
    inverse_diff = float((by_inverse - by_solve).abs().max() / by_inverse.abs().max())

    doc = {"command": "benchmarks/obs_select.py", "width": d, "out": args.out, "removals": args.removals,
           "threads": torch.get_num_threads(), "h_inverse_s": round(start_s, 1),
           "eager_removals_timed": args.eager, "eager_s_per_removal": round(eager_s / args.eager, 4),
           "eager_s_extrapolated": round(eager_s / args.eager * args.removals, 1), "deferred_s": round(lazy_s, 1),
           "defer_block": channels.OBS_DEFER, "first_eager_choices_also_removed_by_deferred": same,
           "kept": int(keep.numel()), "lambda_point_solve_s": round(solve_s, 2), "lambda_point_error_s": round(error_s, 2),
           "lambda_search_s_estimate": round(len(channels.DAMP_GRID) * (solve_s + error_s), 1),
           "inverse_width": args.inverse_width, "cholesky_inverse_s": round(inverse_s, 2),
           "cholesky_solve_identity_s": round(solve_i_s, 2), "inverse_max_relative_difference": inverse_diff}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "obs-select.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(RESULTS / "obs-select.md", "\n".join([
        f"# OBS selection at width {d} ({args.out} outputs, {args.removals} removals, {doc['threads']} threads)", "",
        "`.venv/bin/python benchmarks/obs_select.py`", "",
        "| | seconds |", "|---|---|",
        f"| H⁻¹ (Cholesky, then cholesky_solve(I)) | {doc['h_inverse_s']} |",
        f"| step by step: per removal ({args.eager} timed) | {doc['eager_s_per_removal']} |",
        f"| step by step: all {args.removals}, extrapolated | {doc['eager_s_extrapolated']} |",
        f"| deferred (blocks of {channels.OBS_DEFER}): all {args.removals} | {doc['deferred_s']} |",
        f"| refit at one λ on the {doc['kept']} kept channels: factor + solve | {doc['lambda_point_solve_s']} |",
        f"| its held-out error | {doc['lambda_point_error_s']} |",
        f"| a {len(channels.DAMP_GRID)}-point λ search (FASP runs two per MLP pair) | {doc['lambda_search_s_estimate']} |",
        f"| H⁻¹ at width {args.inverse_width} from its Cholesky factor: cholesky_inverse | {doc['cholesky_inverse_s']} |",
        f"| the same by cholesky_solve(I) (largest difference {inverse_diff:.1e} of the largest entry) | "
        f"{doc['cholesky_solve_identity_s']} |",
        "",
        f"The step-by-step greedy's {args.eager} choices are among the deferred run's removals: {same}.", ""]))
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
