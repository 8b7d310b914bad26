"""The benchmark harness: every (bundle, backend, profile) measured in its own fresh process.

:func:`run_bench` checks its inputs up front (profiles, backends, every bundle's files against its
manifest), then starts :mod:`.measure` once per combination, collects the records, and adds the
comparison each pruned or quantized bundle is read by: its speed-up and memory ratio against the dense,
unquantized bundle on the same backend and profile, measured in the same run.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.loading import DEFAULT_MODEL_NAME
from ..errors import InvalidArgument
from ..procutil import die_with_parent_fn
from ..runtime.bundle import Bundle, describe as describe_bundle, load_bundle
from ..runtime.engines import BACKENDS
from .measure import PROGRESS_MARK, host_facts, status_row, summarize, thread_env, usable_cpus
from .profiles import Profile

log = logging.getLogger(__name__)

SCHEMA_NAME = "fasp-edge-bench"
SCHEMA_VERSION = 1
DEFAULT_REPS = 5
MEASURE_TIMEOUT_S = 3600


@dataclass
class Target:
    """A bundle under test, with the short label the tables use."""

    label: str
    bundle: Bundle
    external: str | None = None  # "optimum-onnx": a reference export, not a fasp-edge bundle

    @property
    def manifest(self) -> dict:
        return self.bundle.manifest

    @property
    def pruned(self) -> bool:
        return bool(self.manifest["model"].get("fasp"))

    @property
    def quantization(self) -> str:
        return self.manifest.get("quantization", "none")

    def describe(self) -> dict:
        m = self.manifest
        fasp = m["model"].get("fasp") or None
        summary = describe_bundle(self.bundle)  # path, formats, quantization, max_context, bytes
        return {"label": self.label, "external": self.external, **summary, "files_bytes": summary.pop("bytes"),
                "pruning": ({"method": fasp.get("method"), "sparsity": fasp.get("sparsity"),
                             **({"param_reduction": fasp["param_reduction"]} if fasp.get("param_reduction") else {})}
                            if fasp else None),
                "precision": m.get("precision", "float32"), "parameters": m["model"].get("parameters"),
                "source": m["model"].get("source")}


def check_backends(backends: list[str]) -> list[str]:
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise InvalidArgument(f"unknown backend {','.join(bad) or '(none)'}; choose from {', '.join(BACKENDS)} "
                              "(e.g. --backends pte,onnx)")
    return list(dict.fromkeys(backends))


def load_targets(paths: list[str]) -> list[Target]:
    """Load and verify every bundle (sizes and sha256 against its manifest) before anything runs."""
    if not paths:
        raise InvalidArgument("no bundle given; pass one or more bundle folders made by `fasp-edge export`")
    targets: list[Target] = []
    for p in paths:
        targets.append(Target(unique_label(Path(p).resolve().name, targets), load_bundle(p)))
    return targets


def unique_label(name: str, targets: list[Target]) -> str:
    label, n = name, 2
    while any(t.label == label for t in targets):
        label, n = f"{name}-{n}", n + 1
    return label


def optimum_target(path: str | os.PathLike) -> Target:
    """An ``optimum-cli export onnx --task text-generation-with-past`` folder, as a reference ONNX target.

    It has no manifest; a minimal one is made from its config and files (nothing to verify against).
    """
    folder = Path(path)
    if not (folder / "model.onnx").is_file() or not (folder / "config.json").is_file():
        raise InvalidArgument(f"--optimum-onnx {folder}: expected an optimum ONNX export folder with model.onnx and "
                              "config.json (optimum-cli export onnx -m MODEL --task text-generation-with-past DIR)")
    cfg = json.loads((folder / "config.json").read_text())
    files = {f.name: {"bytes": f.stat().st_size} for f in folder.iterdir() if f.is_file()}
    data = sorted(n for n in files if n.startswith("model.onnx") and n != "model.onnx")
    manifest = {"format": "optimum-onnx", "model": {"fasp": None, "source": str(folder), "vocab_size": cfg["vocab_size"],
                                                    "parameters": None},
                "max_context": int(cfg.get("max_position_embeddings") or 2048),
                "tokenizer": {"hf_tokenizer": "tokenizer.json", "add_bos": False, "bos_id": None},
                "quantization": "none", "precision": "float32",
                "artifacts": {"onnx": {"file": "model.onnx", "external_data": data}}, "files": files}
    return Target(folder.resolve().name, Bundle(folder, manifest), external="optimum-onnx")


def torch_source(target: Target) -> str | None:
    """What :func:`load_model` needs for the PyTorch model a bundle came from (None: the embedded default)."""

    src = target.manifest["model"].get("source")
    if src == DEFAULT_MODEL_NAME:
        return None
    return src


# ------------------------------------------------------------------------------------------ running
def _row(target: Target, backend: str, profile: Profile, status: str, reason: str) -> dict:
    return status_row(target.label, backend, profile.name, status, reason)


def run_measurement(target: Target, backend: str, profile: Profile, reps: int, warmup: int,
                    torch_model: str | None = None, on_rep=None, timeout_s: float = MEASURE_TIMEOUT_S) -> dict:
    """One measurement in a fresh interpreter (see :mod:`.measure`); never raises for a runtime failure."""
    spec = {"bundle": str(target.bundle.path), "label": target.label, "backend": backend,
            "profile": profile.to_dict(), "reps": reps, "warmup": warmup, "torch_model": torch_model,
            "manifest": target.manifest}
    with tempfile.TemporaryDirectory(prefix="fasp-edge-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "fasp_edge.runtime_bench.measure", str(spec_path), str(out_path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               **thread_env(backend, profile.threads, profile.cpu_affinity, usable_cpus())}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                errors="replace", preexec_fn=die_with_parent_fn())
        tail: deque[str] = deque(maxlen=20)

        def pump() -> None:
            for line in proc.stderr:
                if line.startswith(PROGRESS_MARK):
                    if on_rep:
                        on_rep()
                elif line.strip():
                    tail.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return _row(target, backend, profile, "failed", f"timed out after {timeout_s:.0f} s")
        except BaseException:  # Ctrl-C: stop the child too, leave nothing behind
            proc.kill()
            proc.wait()
            raise
        reader.join(timeout=5)
        if out_path.is_file():
            result = json.loads(out_path.read_text())
            if result["status"] == "failed" and tail:
                result["reason"] += f" (last output: {tail[-1][:300]})"
            return result
        detail = f"; last output: {tail[-1][:300]}" if tail else ""
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return _row(target, backend, profile, "failed", f"the measuring process {how} (out of memory?){detail}")


def plan(targets: list[Target], backends: list[str], profiles: list[Profile], omit_missing: bool = False) -> list[tuple]:
    """Every (target, backend, profile) to measure, or to record as skipped with the reason (``omit_missing``:
    leave out, rather than list as skipped, a backend whose artifact a bundle does not have)."""
    jobs = []
    torch_seen: dict[tuple, str] = {}
    for profile in profiles:
        for target in targets:
            for backend in backends:
                if backend == "torch" and target.external:
                    jobs.append(("skip", target, backend, profile, "a reference ONNX export is measured on the onnx "
                                                                    "backend only"))
                elif backend == "torch":
                    src = torch_source(target)
                    # one PyTorch model is one set of weights, however its bundles name its folder
                    key = (profile.name, target.manifest["model"].get("weights_sha256") or src)
                    if key in torch_seen:
                        jobs.append(("skip", target, backend, profile,
                                     f"same PyTorch model as bundle {torch_seen[key]} (the torch backend runs the "
                                     "source checkpoint, not an artifact), measured there"))
                        continue
                    torch_seen[key] = target.label
                    jobs.append(("run", target, backend, profile, src))
                elif backend not in target.bundle.formats:
                    if omit_missing:
                        continue
                    jobs.append(("skip", target, backend, profile,
                                 f"the bundle has no {backend} artifact (it has {', '.join(target.bundle.formats)})"))
                else:
                    jobs.append(("run", target, backend, profile, None))
    return jobs


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from the same measurement repeated in several fresh processes: the metrics pool every counted
    run (load time: one per process), memory keeps the highest peak, ``not_applied`` the union."""
    ok = [r for r in rounds if r["status"] == "ok"]
    if len(ok) < len(rounds) or len(rounds) == 1:
        return next((r for r in rounds if r["status"] != "ok"), rounds[0])
    out = dict(ok[0])
    out["metrics"] = {k: summarize([v for r in ok for v in r["metrics"][k]["values"]]) for k in ok[0]["metrics"]}
    out["memory"] = max((r["memory"] for r in ok), key=lambda m: m["model_rss_mb"])
    out["not_applied"] = list(dict.fromkeys(n for r in ok for n in r["not_applied"]))
    out["rounds"] = len(ok)
    # each round's own median: a speed-up is the median of the per-round ratios (see _versus)
    out["round_decode_tokens_per_s"] = [r["metrics"]["decode_tokens_per_s"]["median"] for r in ok]
    return out


def run_order(jobs: list[tuple], measured: list[int], rnd: int) -> list[int]:
    """The order the jobs ``measured`` run in during round ``rnd``: rows that are compared with each other
    (one profile, one backend, one precision) run back to back, the dense reference next to its pruned rows,
    so a ratio is taken over seconds rather than minutes of a shared machine's drift; every other round runs
    the list backwards (pruned first), so a steady drift falls on both sides of a ratio alike."""
    profiles = list(dict.fromkeys(jobs[i][3].name for i in measured))
    groups: dict[tuple, int] = {}

    def key(i: int):
        _, target, backend, profile, _ = jobs[i]
        precision = _quant_of(target, backend) if not target.external else "none"
        group = groups.setdefault((profile.name, backend, precision), len(groups))
        return (profiles.index(profile.name), group, bool(target.pruned or target.external), i)

    order = sorted(measured, key=key)
    return order[::-1] if rnd % 2 else order


def run_bench(bundle_paths: list[str], profiles: list[Profile], backends: list[str], *, reps: int = DEFAULT_REPS,
              warmup: int = 1, rounds: int = 1, optimum_onnx: list[str] | None = None, progress: bool = True,
              omit_missing: bool = False) -> dict:
    """Measure every bundle on every backend under every profile; return the ``bench.json`` document.

    With ``rounds`` > 1 the whole list of measurements is run that many times over, each time in fresh
    processes, and each row pools its runs: slow drift of a shared machine then falls on every row alike
    instead of on whichever ran during it (:func:`run_order` puts rows that are compared side by side, and
    :func:`_versus` takes a speed-up round by round). ``optimum_onnx`` folders (optimum's ONNX export of the dense
    model) are measured on the onnx backend as the reference our own ONNX export is compared with.
    ``omit_missing`` leaves out the backends a bundle has no artifact for (bundles of one format each).
    """
    if reps < 1 or warmup < 0 or rounds < 1:
        raise InvalidArgument(f"--reps and --rounds must be >= 1 and --warmup >= 0 (got {reps}, {rounds}, {warmup})")
    backends = check_backends(backends)
    targets = load_targets(bundle_paths)
    for p in optimum_onnx or []:
        ref = optimum_target(p)
        ref.label = unique_label(ref.label, targets)
        targets.append(ref)
    jobs = plan(targets, backends, profiles, omit_missing)
    started = time.time()
    from tqdm import tqdm

    runs = sum(1 for j in jobs if j[0] == "run")
    measured: dict[int, list[dict]] = {i: [] for i, j in enumerate(jobs) if j[0] == "run"}
    with tqdm(total=rounds * runs * (reps + warmup), unit="gen", desc="bench", disable=not progress,
              leave=False) as bar:
        for rnd in range(rounds):
            for i in run_order(jobs, list(measured), rnd):
                _, target, backend, profile, extra = jobs[i]
                bar.set_postfix_str(f"{target.label} {backend} {profile.name}"
                                    + (f" round {rnd + 1}/{rounds}" if rounds > 1 else ""))
                done_before = bar.n
                res = run_measurement(target, backend, profile, reps, warmup, torch_model=extra,
                                      on_rep=lambda: bar.update(1))
                bar.update(done_before + reps + warmup - bar.n)
                if res["status"] != "ok":
                    log.warning("%s / %s / %s %s: %s", target.label, backend, profile.name, res["status"],
                                res["reason"])
                measured[i].append(res)
    results = [merge_rounds(measured[i]) if kind == "run" else _row(target, backend, profile, "skipped", extra)
               for i, (kind, target, backend, profile, extra) in enumerate(jobs)]
    add_comparisons(results, targets)
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "created_unix": int(started),
            "duration_s": round(time.time() - started, 1), "host": host_facts(),
            "settings": {"reps": reps, "warmup": warmup, "rounds": rounds, "backends": backends,
                         "profiles": [p.name for p in profiles]},
            "profiles": {p.name: p.to_dict() for p in profiles},
            "bundles": [t.describe() for t in targets], "results": results}


# ------------------------------------------------------------------------------------------ comparing
def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 4)


def _quant_of(t: Target, backend: str) -> str:
    """The precision a row of ``t`` runs at: the torch backend runs the source model in fp32; a quantized bundle's
    includes its recipe's weight grid (a pruned ``--qparams gptq`` bundle is set against the dense gptq one, not
    against the dense asymmetric one)."""
    if backend == "torch":
        return "none"
    qparams = ((t.manifest.get("export_settings") or {}).get("recipe") or {}).get("qparams")
    return t.quantization if qparams is None or t.quantization == "none" else f"{t.quantization}/{qparams}"


def reference_row(r: dict, targets: list[Target], ok: dict, *, precision: str) -> dict | None:
    """The row ``r`` is compared with: the first dense (unpruned) bundle measured on the same backend and profile
    at ``precision`` (``r``'s own for like with like, ``"none"`` for a cross-precision ratio). The torch backend
    runs a bundle's source model in fp32, so any dense bundle's torch row will do."""
    for t in targets:
        if t.pruned or t.external or _quant_of(t, r["backend"]) != precision:
            continue
        ref = ok.get((t.label, r["backend"], r["profile"]))
        if ref is not None:
            return ref
    return None


def _decode_speedup(r: dict, ref: dict) -> float | None:
    """``r``'s decode speed over ``ref``'s: with several rounds, the median of the per-round ratios (each round
    measures the two rows back to back, :func:`run_order`), else the ratio of the medians."""
    a, b = r.get("round_decode_tokens_per_s"), ref.get("round_decode_tokens_per_s")
    if a and b and len(a) == len(b) and len(a) > 1 and all(b):
        return round(statistics.median(x / y for x, y in zip(a, b)), 4)
    return _ratio(r["metrics"]["decode_tokens_per_s"]["median"], ref["metrics"]["decode_tokens_per_s"]["median"])


def _versus(r: dict, ref: dict) -> dict:
    m, rm = r["metrics"], ref["metrics"]
    return {
        "reference": ref["bundle"],
        "decode_speedup": _decode_speedup(r, ref),
        "decode_speedup_pooled": _ratio(m["decode_tokens_per_s"]["median"], rm["decode_tokens_per_s"]["median"]),
        "prefill_speedup": _ratio(m["prefill_tokens_per_s"]["median"], rm["prefill_tokens_per_s"]["median"]),
        "ttft_speedup": _ratio(rm["ttft_s"]["median"], m["ttft_s"]["median"]),
        "load_speedup": _ratio(rm["load_s"]["median"], m["load_s"]["median"]),
        "memory_ratio": _ratio(r["memory"]["model_rss_mb"], ref["memory"]["model_rss_mb"]),
        "peak_rss_ratio": _ratio(r["memory"]["peak_rss_mb"], ref["memory"]["peak_rss_mb"]),
        "size_ratio": _ratio(r["artifact_bytes"], ref["artifact_bytes"]),
    }


def add_comparisons(results: list[dict], targets: list[Target]) -> None:
    """Give each measured row its ratios against the dense bundle of the same backend, precision and profile
    (``vs_dense``: like with like, so pruning is credited only with what pruning did), each quantized row its
    ratios against the dense fp32 bundle (``vs_dense_fp32``: across precisions, labelled so), and each ONNX row
    of a bundle its ratios against optimum's export (``vs_optimum``)."""
    by_label = {t.label: t for t in targets}
    ok = {(r["bundle"], r["backend"], r["profile"]): r for r in results if r["status"] == "ok"}
    optimum = {pr: x for (lbl, be, pr), x in ok.items() if by_label[lbl].external == "optimum-onnx"}
    for r in results:
        if r["status"] != "ok":
            continue
        external = by_label[r["bundle"]].external
        if r["backend"] == "onnx" and not external and r["profile"] in optimum:
            r["vs_optimum"] = _versus(r, optimum[r["profile"]])
        precision = _quant_of(by_label[r["bundle"]], r["backend"])
        ref = None if external else reference_row(r, targets, ok, precision=precision)
        r["vs_dense"] = None if ref is None or ref is r else _versus(r, ref)
        if not external and precision != "none":
            fp32 = reference_row(r, targets, ok, precision="none")
            if fp32 is not None:
                r["vs_dense_fp32"] = _versus(r, fp32)
