"""One measurement, in the fresh process it owns: ``python -m fasp_edge.runtime_bench.measure SPEC RESULT``.

The harness (:mod:`.harness`) writes a JSON spec (bundle, backend, profile, repetitions), starts this
module in a new interpreter, and reads the JSON result back. A fresh process per measurement means
no thread pool, allocator or page-cache state of one runtime colours the next, and the peak RSS is
that of one model on one runtime.

The profile is applied before any runtime library is imported: until then this process has loaded only the
standard library (``import fasp_edge`` and this module load nothing else; the result records what was loaded,
``applied.modules_before_profile``, and a test checks it is nothing). Then: process CPU affinity, the
OpenMP/BLAS thread variables torch reads when it loads (:func:`thread_env`; the harness also starts the
process with them), and the thread count of each runtime (``torch.set_num_threads``, 1 where torch only
carries tokens and logits for another runtime; ONNX Runtime intra/inter-op threads without spinning;
ExecuTorch's thread pool). What the host cannot honour (more threads than usable CPUs, CPU ids it does not
have, affinity on an OS without it) is clamped and listed in ``not_applied``. The runtimes start their
thread pools after the affinity is applied, so every pool thread inherits it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

from ..errors import FaspError, InvalidArgument
from ..fsutil import state_dict_sha256
from ..runtime.bundle import artifact_bytes
from ..versions import library_versions

#: the OpenMP/BLAS thread variables torch reads when it loads (set here before it does)
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: libraries that start thread pools or read the thread variables at import: none may load before the profile
HEAVY_MODULES = ("torch", "numpy", "transformers", "executorch", "onnxruntime", "onnx", "torchao", "tokenizers")
PROGRESS_MARK = "fasp-edge-progress: "  # a line on stderr per finished generation, for the harness's progress bar
PROMPT_TEXT = (
    "Small language models run on phones, smart speakers and single-board computers when they are pruned and "
    "quantized with care. A model that answers in a tenth of a second feels instant, one that takes a second "
    "feels slow, and one that does not fit in memory does not run at all. "
)


# ------------------------------------------------------------------------------------------ host
def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        for line in text.splitlines():
            if line.split(":")[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        try:
            import subprocess

            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def usable_cpus() -> list[int]:
    """CPU ids this process may run on (all of them where the OS has no affinity API)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _memory_total_mb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**20, 1)
    except ImportError:
        return None


def host_facts() -> dict:
    """What a reader needs to compare figures across machines."""
    return {"cpu_model": _cpu_model(), "logical_cpus": os.cpu_count() or 1, "usable_cpus": len(usable_cpus()),
            "os": platform.platform(), "arch": platform.machine(), "memory_total_mb": _memory_total_mb(),
            "versions": library_versions()}


# ------------------------------------------------------------------------------------------ profile
def plan_cpus(threads: int, affinity, usable: list[int]) -> tuple[list[int], int, list[str]]:
    """The CPUs to pin to and the thread count to use, plus what of the profile had to give way."""
    notes: list[str] = []
    if affinity == "all":
        cpus = list(usable)
    elif affinity == "first":
        cpus = usable[:threads]
    else:
        cpus = [c for c in affinity if c in usable]
        missing = [c for c in affinity if c not in usable]
        if missing:
            notes.append(f"cpu_affinity: CPUs {missing} are not usable on this host (usable: {usable}); "
                         f"pinned to {cpus or usable}")
        cpus = cpus or list(usable)
    applied_threads = min(threads, len(cpus))
    if applied_threads < threads:
        notes.append(f"threads: the profile asks for {threads}, this host gives the process {len(cpus)} usable "
                     f"CPU(s); ran {applied_threads} thread(s)")
    return cpus, applied_threads, notes


def torch_threads_for(backend: str, profile_threads: int, affinity, usable: list[int]) -> int:
    """torch's thread count in a measurement: the profile's (as clamped) on the torch backend, else 1.

    Beside ExecuTorch or ONNX Runtime torch only moves tokens and logits, and an OpenMP pool of more
    threads spin-waits after each of those small ops on the cores the runtime's own pool needs. Measured
    (2 cores, dense SmolLM2 pte-8da4w-gptq, hub profile, 2026-12-04): 107-123 tok/s with torch loaded
    under OMP_NUM_THREADS unset, 149-164 tok/s with it set to 1 before torch loads.
    """
    return plan_cpus(profile_threads, affinity, usable)[1] if backend == "torch" else 1


def thread_env(backend: str, profile_threads: int, affinity, usable: list[int]) -> dict[str, str]:
    """The environment a measuring process must start with: the OpenMP/BLAS pools sized before torch loads."""
    n = str(torch_threads_for(backend, profile_threads, affinity, usable))
    return {v: n for v in THREAD_ENV_VARS}


def apply_affinity(cpus: list[int]) -> list[str]:
    if not hasattr(os, "sched_setaffinity"):
        return [f"cpu_affinity: {platform.system()} has no process CPU affinity; the OS schedules the threads"]
    os.sched_setaffinity(0, cpus)
    return []


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far.

    On Linux this is ``VmHWM`` of ``/proc/self/status``, the high-water mark of this program's own memory:
    ``getrusage``'s ``ru_maxrss`` survives ``exec``, so a measurement started from a large process (``fasp-edge
    run`` after pruning) would report its parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return getattr(psutil.Process().memory_info(), "peak_wset", 0) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def status_row(label: str, backend: str, profile: str, status: str, reason: str | None) -> dict:
    """The head every result row starts with; a skipped or failed row is only this."""
    return {"bundle": label, "backend": backend, "profile": profile, "status": status, "reason": reason}


def summarize(values: list[float]) -> dict:
    """Median, min, max and count, plus the values themselves (rounds from several processes are merged)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": list(values)}


# ------------------------------------------------------------------------------------------ prompt
def prompt_ids(bundle_dir: Path, manifest: dict, n: int) -> list[int]:
    """``n`` token ids of a fixed English text, as the bundle's tokenizer encodes it (BOS first if it adds one)."""
    tok = manifest.get("tokenizer", {})
    ids: list[int] = []
    path = bundle_dir / (tok.get("hf_tokenizer") or "tokenizer.json")
    if path.is_file():
        from tokenizers import Tokenizer

        enc = Tokenizer.from_file(str(path)).encode(PROMPT_TEXT, add_special_tokens=False).ids
        if tok.get("add_bos") and tok.get("bos_id") is not None:
            ids.append(int(tok["bos_id"]))
        while len(ids) < n and enc:
            ids.extend(enc)
    if len(ids) < n:  # no usable tokenizer file: a seeded spread of ids (speed does not depend on the text)
        vocab = int(manifest["model"]["vocab_size"])
        ids = [(i * 7919 + 13) % vocab for i in range(n)]
    return ids[:n]


# ------------------------------------------------------------------------------------------ the measurement
def _import_backend(backend: str) -> None:
    from ..runtime.engines import BackendUnavailable

    module = {"pte": "executorch.runtime", "onnx": "onnxruntime", "torch": "transformers"}[backend]
    try:
        __import__(module)
    except ImportError as e:
        raise BackendUnavailable(f"{module} cannot be imported ({e}); install it to measure the {backend} "
                                 "backend") from None


def check_same_model(loaded, manifest: dict) -> None:
    """Refuse to time a PyTorch model that is not the one the bundle was exported from."""
    from ..models.base import count_parameters

    rec = manifest["model"]
    why = None
    params = count_parameters(loaded.model)
    if rec.get("parameters") is not None and params != rec["parameters"]:
        why = f"it has {params} parameters, the manifest {rec['parameters']}"
    elif json.loads(json.dumps(getattr(loaded.model.config, "fasp", None))) != rec.get("fasp"):
        why = "its pruning record (config.json 'fasp': method, sparsity, calibration) differs from the manifest's"
    elif rec.get("weights_sha256") and state_dict_sha256(loaded.model) != rec["weights_sha256"]:
        why = "its weights differ from the ones the bundle was exported from"
    if why:
        raise InvalidArgument(f"the PyTorch model at {loaded.source} is not the one this bundle was exported from: "
                              f"{why}; re-export the bundle from it, or leave out --backends torch")


def _open(spec: dict, manifest: dict, threads: int):
    """Open the engine for ``spec``; returns (engine, artifact bytes, the loaded PyTorch model or None)."""
    from ..runtime.engines import open_artifact, open_checkpoint

    backend = spec["backend"]
    if backend == "torch":
        engine, loaded = open_checkpoint(spec.get("torch_model"), int(manifest["max_context"]), threads=threads)
        size = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
        return engine, size, loaded
    return open_artifact(Path(spec["bundle"]), manifest, backend, threads=threads), artifact_bytes(manifest, backend), None


def measure(spec: dict) -> dict:
    """Apply the profile, load the engine, run warm-up and counted generations; return the result record."""
    prof = spec["profile"]
    loaded_before = [m for m in HEAVY_MODULES if m in sys.modules]
    result = status_row(spec["label"], spec["backend"], prof["name"], "ok", None)
    cpus, threads, notes = plan_cpus(prof["threads"], prof.get("cpu_affinity", "first"), usable_cpus())
    notes += apply_affinity(cpus)
    torch_threads = torch_threads_for(spec["backend"], prof["threads"], prof.get("cpu_affinity", "first"),
                                      usable_cpus())
    if "torch" not in sys.modules:
        os.environ.update(thread_env(spec["backend"], prof["threads"], prof.get("cpu_affinity", "first"),
                                     usable_cpus()))
    env_at_torch_load = {v: os.environ.get(v) for v in THREAD_ENV_VARS}
    for var, value in env_at_torch_load.items():
        if value != str(torch_threads):
            notes.append(f"{var}: was {value!r} when torch loaded, not {torch_threads!r} (something loaded torch "
                         "before the profile was applied; torch.set_num_threads still applied)")
    result["not_applied"] = notes
    manifest = spec["manifest"]
    exported_here = manifest.get("format") == "fasp-edge-bundle"  # not a reference export with its own context
    if exported_here and manifest["max_context"] != prof["context_length"]:
        notes.append(f"context_length: the bundle was exported for {manifest['max_context']} positions, the "
                     f"profile asks for {prof['context_length']} (the KV cache is fixed at export; re-export "
                     f"with --max-context {prof['context_length']} to match)")
    need = prof["prompt_tokens"] + prof["generate_tokens"]
    if need > manifest["max_context"]:
    
        raise InvalidArgument(f"the profile needs {need} positions (prompt + generation), the bundle holds "
                              f"{manifest['max_context']}; re-export with a larger --max-context")

    _import_backend(spec["backend"])
    import torch

    from ..runtime.engines import generate

    torch.set_num_threads(torch_threads)
    ids = prompt_ids(Path(spec["bundle"]), manifest, prof["prompt_tokens"])
    baseline = _rss_mb()
    t0 = time.perf_counter()
    engine, size, loaded = _open(spec, manifest, threads)
    engine.step(torch.tensor(ids[:1]), 0)  # a load is only done when the first call can run
    load_s = time.perf_counter() - t0
    if loaded is not None:  # outside the timed load: hashing the weights is not part of loading them
        check_same_model(loaded, manifest)
    engine.reset()
    result["applied"] = {"cpu_affinity": usable_cpus() if hasattr(os, "sched_getaffinity") else None,
                         "threads": threads, **engine.thread_settings(),
                         "thread_env_at_torch_load": env_at_torch_load, "modules_before_profile": loaded_before}

    runs = []
    reps, warmup = int(spec["reps"]), int(spec["warmup"])
    for i in range(warmup + reps):
        res = generate(engine, ids, prof["generate_tokens"], eos_ids=())
        if i >= warmup:
            runs.append(res)
        print(f"{PROGRESS_MARK}{i + 1}/{warmup + reps}", file=sys.stderr, flush=True)
    peak = _peak_rss_mb()
    budget = prof["memory_budget_mb"]
    model_rss = max(peak - baseline, 0.0)
    result.update({
        "prompt_tokens": len(ids), "generated_tokens": prof["generate_tokens"], "artifact_bytes": int(size),
        "metrics": {
            "load_s": summarize([load_s]),
            "ttft_s": summarize([r.ttft_s for r in runs]),
            "prefill_tokens_per_s": summarize([r.prefill_tokens_per_s for r in runs]),
            "decode_tokens_per_s": summarize([r.decode_tokens_per_s for r in runs]),
        },
        "memory": {"peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
                   "model_rss_mb": round(model_rss, 1), "budget_mb": budget,
                   "verdict": "within budget" if model_rss <= budget else "over budget"},
    })
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())

    head = (spec["label"], spec["backend"], spec["profile"]["name"])
    try:
        result = measure(spec)
    except FaspError as e:  # backend missing, wrong model, profile cannot fit: skipped, with the reason
        result = status_row(*head, "skipped", str(e))
    except Exception as e:  # noqa: BLE001 - a runtime failing on one artifact must not stop the others
        traceback.print_exc()
        result = status_row(*head, "failed", f"{type(e).__name__}: {e}")
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
