"""CUDA check: pruning with --device cuda gives the same model as on the CPU, with only the layer being
pruned on the GPU.

    python benchmarks/cuda_parity.py --model ../shared/data/stories260K \
        --calib-file ../shared/data/tinystories/TinyStories-valid-sample.txt

Prints one JSON object: per method, whether the kept channels are identical, the largest weight and
logit differences, the GPU memory peak, and seconds on each device.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fasp_edge import load_model, prune
from fasp_edge.models import family_for
from fasp_edge.pipeline.calibration import calibration_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib-file", required=True)
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_parity.py: no CUDA device")
    tok = load_model(args.model).tokenizer
    cal = calibration_windows(tok, file=args.calib_file, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "methods": {}}
    for method in ("wanda-sp", "fasp"):
        runs = {}
        for device in ("cpu", "cuda"):
            model = load_model(args.model).model
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            r = prune(model, tok, sparsity=args.sparsity, method=method, calibration=cal.windows, device=device,
                      progress=False)
            seconds = time.perf_counter() - t0
            on_cpu = all(p.device.type == "cpu" for p in model.parameters())
            runs[device] = (model, r, seconds, on_cpu, torch.cuda.max_memory_allocated())
        (m_cpu, r_cpu, s_cpu, _, _), (m_gpu, r_gpu, s_gpu, back_on_cpu, peak) = runs["cpu"], runs["cuda"]
        same_keep = all(torch.equal(a.mlp_keep, b.mlp_keep) and torch.equal(a.attn_keep, b.attn_keep)
                        for a, b in zip(r_cpu.decisions, r_gpu.decisions))
        wdiff = max((a - b).abs().max().item() for a, b in zip(m_cpu.state_dict().values(), m_gpu.state_dict().values()))
        with torch.no_grad():
            ldiff = (m_cpu(cal.windows[:4]).logits - m_gpu(cal.windows[:4]).logits).abs().max().item()
        report["methods"][method] = {
            "same_kept_channels": same_keep, "max_weight_diff": wdiff, "max_logit_diff": ldiff,
            "model_back_on_cpu": back_on_cpu, "cuda_peak_mb": round(peak / 2**20, 1),
            "cpu_seconds": round(s_cpu, 2), "cuda_seconds": round(s_gpu, 2),
            "layers": len(family_for(m_cpu).layers(m_cpu)),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
