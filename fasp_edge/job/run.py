"""``fasp-edge run``: prune -> evaluate -> export -> bench -> report, from one configuration.

The run folder ``<output_dir>/<name>/`` holds one folder per stage, each written atomically with a
fingerprint of its inputs and settings (:mod:`.stages`):

    config.toml                 the exact configuration of the last run
    calibration/                calibration windows (text or self-generated) — stage ``calibrate``
    heldout/                    held-out self-generated text for agreement    — stage ``evaluate``
    pruned/<method>-<s>/        one pruned checkpoint per sparsity            — stage ``prune``
    evaluate/<model>/           parameters, perplexity, agreement, tasks      — stage ``evaluate``
    bundles/<model>-<artifact>/ one verified bundle per model and artifact    — stage ``export``
    artifact-tasks/<bundle>/    zero-shot task scores through each artifact   — stage ``export``
    bench/                      bench.json, bench.md, plots                   — stage ``bench``
    run.json, report.md, report.html                                          — stage ``report``

Exports run side by side in child processes (``export.jobs``): lowering to XNNPACK is single-threaded
Python, so two of them use two cores. A child dies with the run (Linux: parent-death signal), and its
half-written bundle is only ever inside a temporary folder that the next run removes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..artifacts import BY_KEY, CALIBRATED_QUANTS
from ..checkpoints.loading import default_model_folder, load_model, load_tokenizer
from ..checkpoints.pruned import load_pruned
from ..errors import FaspError, InvalidArgument
from ..export.bundle import QUALITY_SEQLEN, QUALITY_WINDOWS
from ..export.quantize import DEFAULT_RECIPE
from ..fsutil import atomic_write_text, sha256_file, state_dict_sha256
from ..models import family_for
from ..models.base import count_embedding_parameters, count_parameters
from ..pipeline.calibration import SELF_SAMPLER, calibration_windows, read_text_file, self_generated_windows
from ..pipeline.fasp import prune_checkpoint
from ..pipeline.perplexity import agreement, perplexity
from ..pipeline.tasks import (StepScorer, TaskTooLong, TorchScorer, check_task_context, data_root, evaluate_tasks,
                              versions)
from ..procutil import die_with_parent_fn
from ..runtime.bundle import artifact_bytes, load_bundle
from ..runtime.engines import open_engine
from ..runtime_bench.harness import check_backends, run_bench
from ..runtime_bench.measure import host_facts
from ..runtime_bench.profiles import resolve_profiles
from ..runtime_bench.report import write_report
from .config import STAGES, RunConfig, model_label
from .report import write_run_report
from .stages import StageResult, fingerprint, run_stage, sweep_temporaries

log = logging.getLogger("fasp_edge")


class RunError(FaspError):
    """A stage of a run failed for a reason the user can act on."""


@dataclass
class ModelEntry:
    """A model the run holds: the dense source or one pruned checkpoint."""

    label: str
    fingerprint: str
    path: Path | None = None  # checkpoint folder (None: the dense source)
    sparsity: float | None = None
    param_reduction: float | None = None  # a model pruned to a parameter budget (sparsity then None)


@dataclass
class RunState:
    cfg: RunConfig
    force: set[str]
    progress: bool
    stages: list[dict] = field(default_factory=list)
    _dense: object = None
    _step: int = 0
    total: int = 0

    # ---------------------------------------------------------------- progress
    def announce(self, stage: str, what: str) -> None:
        self._step += 1
        log.info("[%d/%d] %s %s", self._step, self.total, stage, what)

    def record(self, res: StageResult, stage: str, label: str = "") -> StageResult:
        self.stages.append({"stage": stage, "name": res.name, "folder": str(res.folder), "skipped": res.skipped,
                            "seconds": res.seconds, "fingerprint": res.fingerprint})
        log.info("    %s%s", f"{label}: " if label else "", "up to date, skipped" if res.skipped else
                 f"done in {res.seconds:.0f} s")
        return res

    # ---------------------------------------------------------------- the dense source
    def dense(self):
        """The dense source model, loaded once (float32, CPU)."""
        if self._dense is None:
            self._dense = load_source(self.cfg)
        return self._dense

    def stage(self, stage: str, name: str, folder: Path, fp: str, build) -> StageResult:
        self.announce(stage, name)
        return self.record(run_stage(name, folder, fp, build, force=stage in self.force), stage)


def source_args(cfg: RunConfig) -> tuple[str | None, str | None]:
    """``model.source`` and ``model.gguf_file`` as :func:`load_model` takes them (None where empty)."""
    m = cfg["model"]
    return m["source"] or None, m["gguf_file"] or None


def load_source(cfg: RunConfig):
    """A fresh copy of the dense source model (pruning changes a model in place)."""

    source, gguf = source_args(cfg)
    return load_model(source, gguf_file=gguf, trust_remote_code=cfg["model"]["trust_remote_code"])


def _file_fp(path: Path | None) -> str | None:
    return None if path is None else sha256_file(path)  # load_config checked that it exists


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class _Children:
    """Child processes of the run; all killed (and waited for) when the run is interrupted."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, cmd: list[str], env: dict, log_file: Path) -> int:
        with self.lock:
            if self.stopping:
                raise KeyboardInterrupt
            with open(log_file, "wb") as out:
                # the child stays in the run's process group (a terminal Ctrl-C reaches it) and, on Linux,
                # is killed when the run dies
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=die_with_parent_fn())
            self.procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.procs.discard(proc)

    def kill_all(self) -> None:
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in procs:
            p.wait()


# ==================================================================================================
def plan_total(cfg: RunConfig) -> int:
    """How many stage steps the run announces (for the [i/n] progress lines)."""
    n_pruned = len(cfg["prune"]["sparsities"]) + len(cfg["prune"]["param_reductions"])
    needs_calib = cfg["prune"]["method"] != "magnitude"
    evaluate = (1 if cfg["evaluate"]["agreement_samples"] else 0) + 1 + n_pruned
    n_export = len(cfg["export"]["dense_artifacts"]) + n_pruned * len(cfg["export"]["artifacts"])
    n_artifact_tasks = n_export if cfg["evaluate"]["tasks"] else 0
    return int(needs_calib) + n_pruned + evaluate + n_export + n_artifact_tasks + (1 if n_export else 0) + 1


def forced_stages(force: list[str] | tuple[str, ...]) -> set[str]:
    """``--force`` stages and every stage after them. A stage's fingerprint is built from its inputs'
    fingerprints, not their bytes, so a rebuilt stage must take what reads it along."""
    return set(STAGES[min(STAGES.index(s) for s in force):]) if force else set()


def run(cfg: RunConfig, *, force: list[str] | tuple[str, ...] = (), progress: bool = True) -> Path:
    """Run the whole job described by ``cfg``; return the run folder (with report.md and report.html)."""
    bad = [s for s in force if s not in STAGES]
    if bad:
        raise InvalidArgument(f"--force {bad[0]}: unknown stage; stages are {', '.join(STAGES)}")
    forced = forced_stages(force)

    # everything a user can get wrong is checked before the first long step (the rest in load_config)
    check_backends(cfg["bench"]["backends"])
    profiles = resolve_profiles(cfg["bench"]["profiles"], [str(cfg.path(f)) for f in cfg["bench"]["profile_files"]])
    calib_file = cfg.path(cfg["calibration"]["text_file"])
    eval_file = cfg.path(cfg["evaluate"]["text_file"])
    text_fps = {"calibration": _file_fp(calib_file), "evaluate": _file_fp(eval_file)}
    folder = cfg.folder
    folder.mkdir(parents=True, exist_ok=True)
    with _run_lock(folder):
        started = time.time()
        swept = sweep_temporaries(folder)
        if swept:
            log.info("removed %d temporary folder(s) an interrupted run left behind", swept)
        state = RunState(cfg, forced, progress, total=plan_total(cfg))
        log.info("run %s: %d steps, folder %s", cfg.name, state.total, folder)
        dense = state.dense()
        _check_tasks(cfg, dense.tokenizer)
        dense_fp = fingerprint({"source": cfg["model"]["source"] or "embedded", "gguf": cfg["model"]["gguf_file"],
                                "weights": state_dict_sha256(dense.model)})
        calib = _calibrate(state, dense_fp, calib_file, text_fps["calibration"])
        pruned = _prune(state, dense_fp, calib)
        evaluation, heldout = _evaluate(state, dense_fp, pruned, eval_file, text_fps["evaluate"])
        state._dense = None  # the exports and the bench run in child processes
        del dense
        bundles = _export(state, [ModelEntry("dense", dense_fp)] + pruned, eval_file, text_fps["evaluate"], calib,
                          heldout)
        _artifact_tasks(state, bundles)

        host = host_facts()
        bench = _bench(state, bundles, profiles, host)

        state.announce("report", "report.md, report.html")
        t0 = time.perf_counter()
        atomic_write_text(folder / "config.toml", cfg.to_toml())  # with the report it belongs to
        doc = {
            "config": cfg.data, "config_source": cfg.source, "started_unix": int(started),
            "duration_s": round(time.time() - started, 1),
            "models": evaluation, "bundles": bundles, "bench": bench, "stages": state.stages,
            "host": host,
        }
        write_run_report(doc, folder)
        log.info("    done in %.1f s", time.perf_counter() - t0)
    log.info("run %s finished in %.0f s: %s", cfg.name, time.time() - started, folder / "report.html")
    return folder


@contextlib.contextmanager
def _run_lock(folder: Path):
    """One run per folder at a time (a second one would fight over the same stage folders)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; run one at a time by hand
        yield
        return
    with open(folder / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunError(f"another fasp-edge run is using {folder}; wait for it to finish or use another "
                           "name (--name)") from None
        yield


# ---------------------------------------------------------------------------------------- calibrate
def _calibrate(state: RunState, dense_fp: str, calib_file: Path | None, file_fp: str | None):
    """Calibration windows (saved as a tensor), or None for magnitude pruning."""
    cfg = state.cfg
    if cfg["prune"]["method"] == "magnitude":
        return None
    c = cfg["calibration"]
    settings = {k: c[k] for k in ("nsamples", "seqlen", "seed")}
    settings.update({"file": file_fp} if calib_file else {"self_generated": True, "temperature": c["temperature"],
                                                           "sampler": SELF_SAMPLER})
    fp = fingerprint(settings, [dense_fp])

    def build(tmp: Path) -> dict:

        loaded = state.dense()
        if calib_file is not None:
            cal = calibration_windows(loaded.tokenizer, file=str(calib_file), nsamples=c["nsamples"],
                                      seqlen=c["seqlen"], seed=c["seed"])
        else:
            cal = self_generated_windows(loaded.model, loaded.tokenizer, nsamples=c["nsamples"], seqlen=c["seqlen"],
                                         seed=c["seed"], temperature=c["temperature"], progress=state.progress)
        torch.save(cal.windows, tmp / "windows.pt")
        return {"description": cal.description}

    what = f"{c['nsamples']} x {c['seqlen']} tokens " + (f"of {calib_file.name}" if calib_file else
                                                         f"sampled from the model (temperature {c['temperature']:g})")
    res = state.stage("calibrate", what, state.cfg.folder / "calibration", fp, build)
    return res


def _windows(res: StageResult | None) -> torch.Tensor | None:
    return None if res is None else torch.load(res.folder / "windows.pt")


# ---------------------------------------------------------------------------------------- prune
def _prune(state: RunState, dense_fp: str, calib: StageResult | None) -> list[ModelEntry]:
    cfg = state.cfg
    p = cfg["prune"]
    out = []
    # one model per sparsity (the same fraction of every pair), then one per fraction of all parameters
    cuts = [(model_label(p["method"], s), {"sparsity": s}, f"sparsity {s:g}") for s in p["sparsities"]] + \
        [(model_label(p["method"], None, r), {"param_reduction": r, "allocation": p["allocation"]},
          f"{100 * r:g}% of all parameters, {p['allocation']}") for r in p["param_reductions"]]
    plans = []
    for label, cut, what in cuts:
        settings = {k: p[k] for k in ("method", "targets", "align", "damp", "device")} | cut | \
            {k: p[k] for k, old in (("refit_prior", "zero"), ("selection", "score")) if p[k] != old}
        # (refit_prior and selection are left out at their values before the defaults changed, as they were then)
        fp = fingerprint(settings, [dense_fp] + ([calib.fingerprint] if calib else []))
        # a killed run's prune continues from its last finished layer, saved here (gone once the checkpoint is)
        plans.append((label, cut, what, fp, cfg.folder / "pruned" / f".{label}.progress-{fp[:16]}"))
    for stale in (cfg.folder / "pruned").glob(".*.progress-*"):  # progress of settings this run no longer has
        if stale not in {plan[-1] for plan in plans}:
            shutil.rmtree(stale, ignore_errors=True)
    for label, cut, what, fp, progress_dir in plans:

        def build(tmp: Path, cut=cut, progress_dir=progress_dir) -> dict:
            if "prune" in state.force:  # forced: from the start
                shutil.rmtree(progress_dir, ignore_errors=True)
            report = prune_checkpoint(load_source(cfg), tmp, **{"sparsity": None, **cut}, method=p["method"],
                                      targets=p["targets"], align=p["align"], damp=p["damp"], device=p["device"],
                                      refit_prior=p["refit_prior"], selection=p["selection"],
                                      calibration=_windows(calib),
                                      calibration_description=calib.info["description"] if calib else None,
                                      progress=state.progress, resume_dir=progress_dir)
            return {"params_before": report["params_before"], "params_after": report["params_after"]}

        res = state.stage("prune", f"{label} ({p['method']}, {what})", cfg.folder / "pruned" / label, fp, build)
        out.append(ModelEntry(label, fp, res.folder, cut.get("sparsity"), cut.get("param_reduction")))
    return out


# ---------------------------------------------------------------------------------------- evaluate
def _evaluate(state: RunState, dense_fp: str, pruned: list[ModelEntry], eval_file: Path | None,
              file_fp: str | None) -> tuple[list[dict], StageResult | None]:
    """Every model's metrics, and the held-out text stage (None without agreement)."""

    cfg = state.cfg
    e = cfg["evaluate"]
    heldout = None
    if e["agreement_samples"]:
        settings = {"samples": e["agreement_samples"], "seqlen": e["agreement_seqlen"], "seed": e["agreement_seed"],
                    "temperature": cfg["calibration"]["temperature"], "sampler": SELF_SAMPLER}

        def build_heldout(tmp: Path) -> dict:
            loaded = state.dense()
            cal = self_generated_windows(loaded.model, loaded.tokenizer, nsamples=e["agreement_samples"],
                                         seqlen=e["agreement_seqlen"], seed=e["agreement_seed"],
                                         temperature=cfg["calibration"]["temperature"], progress=state.progress)
            torch.save(cal.windows, tmp / "windows.pt")
            return {"description": cal.description}

        heldout = state.stage("evaluate", f"held-out text: {e['agreement_samples']} x {e['agreement_seqlen']} tokens "
                              f"sampled from the dense model (seed {e['agreement_seed']})", cfg.folder / "heldout",
                              fingerprint(settings, [dense_fp]), build_heldout)
    text = read_text_file(str(eval_file)) if eval_file else None
    settings = {"text": file_fp, "seqlen": e["seqlen"], "max_windows": e["max_windows"]}
    if e["tasks"]:  # (absent without tasks: the runs made before tasks existed stay up to date)
        settings["tasks"] = _task_settings(cfg)
    out = []
    for entry in [ModelEntry("dense", dense_fp)] + pruned:
        def build(tmp: Path, entry=entry) -> dict:
            loaded = state.dense()
            model = loaded.model if entry.path is None else load_pruned(entry.path)
            total = count_parameters(model)
            family = family_for(model)
            res: dict = {"parameters": total,
                         "nonembedding_parameters": total - count_embedding_parameters(family, model),
                         "ffn_dims": family.ffn_dims(model), "v_head_dims": family.v_head_dims(model),
                         "head_dim": family.head_dim(model)}
            res["weights_bytes"] = _weights_bytes(entry.path, cfg)
            if text is not None:
                res["perplexity"] = perplexity(model, loaded.tokenizer, text, seqlen=e["seqlen"],
                                               max_windows=e["max_windows"] or None, progress=state.progress)
                res["perplexity"]["text_file"] = eval_file.name
            if heldout is not None and entry.path is not None:
                res["agreement"] = agreement(loaded.model, model, _windows(heldout), progress=state.progress)
            if e["tasks"]:

                res["tasks"] = _task_scores(cfg, TorchScorer(model), loaded.tokenizer, state.progress)
            (tmp / "metrics.json").write_text(json.dumps(res, indent=1) + "\n")
            return res

        parts = (["parameters"] + (["perplexity"] if text is not None else [])
                 + (["agreement"] if heldout is not None and entry.path is not None else [])
                 + ([f"{len(e['tasks'])} task(s)"] if e["tasks"] else []))
        uses_heldout = heldout is not None and entry.path is not None  # the dense model needs no agreement
        res = state.stage("evaluate", f"{entry.label}: {', '.join(parts)}", cfg.folder / "evaluate" / entry.label,
                          fingerprint(settings, [entry.fingerprint] + ([heldout.fingerprint] if uses_heldout else [])),
                          build)
        out.append({"label": entry.label, "sparsity": entry.sparsity,
                    **({"param_reduction": entry.param_reduction} if entry.param_reduction is not None else {}),
                    "path": str(entry.path) if entry.path else None,
                    "fingerprint": entry.fingerprint, **res.info})
    return out, heldout


TASK_SEED = 0  # the seed of evaluate.task_limit's document subset (run.toml says so)


def _task_settings(cfg: RunConfig) -> dict:

    e = cfg["evaluate"]
    return {"names": e["tasks"], "limit": e["task_limit"] or None, "seed": TASK_SEED, "versions": versions()}


def _check_tasks(cfg: RunConfig, tokenizer) -> None:
    """Before the first long step: the eval extra is installed, and every task request fits the artifacts' context."""
    e, x = cfg["evaluate"], cfg["export"]
    if not e["tasks"]:
        return

    data_root()
    if x["artifacts"] or x["dense_artifacts"]:
        try:
            check_task_context(tokenizer, e["tasks"], limit=e["task_limit"] or None, seed=TASK_SEED,
                               max_context=x["max_context"])
        except TaskTooLong as err:
            raise RunError(f"evaluate.tasks: task {err.task}'s longest request is {err.length} tokens, more than "
                           f"export.max_context = {err.context}; raise export.max_context to {err.length} or leave "
                           f"{err.task} out of evaluate.tasks") from None


def _task_scores(cfg: RunConfig, scorer, tokenizer, progress: bool) -> dict:
    """Zero-shot scores as run.json keeps them: per task metrics, and each evaluated document's choice."""

    t = _task_settings(cfg)
    res = evaluate_tasks(scorer, tokenizer, t["names"], limit=t["limit"], seed=t["seed"], progress=progress)
    res.pop("loglikelihoods")
    return res


def _artifact_tasks(state: RunState, bundles: list[dict]) -> None:
    """Zero-shot scores of every bundle through its own artifact's runtime (added to each bundle's entry), and
    the share of documents where it picks what its PyTorch model picks."""
    cfg = state.cfg
    if not cfg["evaluate"]["tasks"] or not bundles:
        return
    settings = _task_settings(cfg)
    for b in bundles:
        fmt = BY_KEY[b["artifact"]].format

        def build(tmp: Path, b=b, fmt=fmt) -> dict:

            bundle = load_bundle(b["path"])
            engine = open_engine(fmt, bundle=bundle)
            art = bundle.manifest["artifacts"][fmt]["file"]
            res = _task_scores(cfg, StepScorer(engine.step, bundle.max_context, f"{fmt} {art}"),
                               load_tokenizer(b["path"]), state.progress)
            res["artifact"] = {"file": art, "sha256": bundle.manifest["files"][art]["sha256"]}
            (tmp / "tasks.json").write_text(json.dumps(res, indent=1) + "\n")
            return res

        res = state.stage("export", f"{b['label']}: {len(settings['names'])} task(s) through its {fmt} artifact",
                          cfg.folder / "artifact-tasks" / b["label"], fingerprint(settings, [b["fingerprint"]]), build)
        b["tasks"] = res.info


def _weights_bytes(checkpoint: Path | None, cfg: RunConfig) -> int | None:
    """Size of a model's weight files: a pruned checkpoint's, or the dense source's (folder or GGUF)."""
    if checkpoint is None:

        source, gguf = source_args(cfg)
        if gguf is not None:
            p = Path(gguf) if source is None else Path(source) / gguf
            return p.stat().st_size if p.is_file() else None
        checkpoint = Path(source) if source is not None else default_model_folder()
        if not checkpoint.is_dir():
            return None  # a hub id
    return sum(f.stat().st_size for f in checkpoint.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


# ---------------------------------------------------------------------------------------- export
@dataclass
class _ExportJob:
    label: str
    model: ModelEntry
    artifact: str
    folder: Path
    fp: str


def heldout_measures_quality(shape: tuple[int, ...] | torch.Size, max_context: int) -> bool:
    """Whether held-out windows of ``shape`` ``[n, T]`` can serve as the exports' quality text: at least
    :data:`~fasp_edge.export.bundle.QUALITY_WINDOWS` windows of ``min(QUALITY_SEQLEN, max_context)`` tokens,
    none longer than the context (a shorter text would measure less than an export measures by itself)."""

    return shape[0] >= QUALITY_WINDOWS and min(QUALITY_SEQLEN, max_context) <= shape[1] <= max_context


def _export(state: RunState, models: list[ModelEntry], quality_file: Path | None, quality_fp: str | None,
            calib: StageResult | None = None, heldout: StageResult | None = None) -> list[dict]:
    """Every model's bundles (the dense references and the pruned ones), each in a child process, two at a time,
    longest first; a bundle whose inputs did not change is reused."""
    plan, jobs = _export_plan(state, models, quality_file, quality_fp, calib, heldout)
    if not jobs:
        return []
    listed = list(jobs)  # model by model, for the report
    jobs.sort(key=lambda j: -BY_KEY[j.artifact].export_cost)  # longest first, so the two slots end together
    workers = max(1, min(state.cfg["export"]["jobs"], len(jobs)))
    plan.threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("    %d exports, %d at a time", len(jobs), workers)
    results = _run_exports(state, jobs, workers, lambda job, children: _export_one(state, plan, job, children))
    return [{"label": j.label, "model": j.model.label, "artifact": j.artifact, "path": str(j.folder),
             "fingerprint": j.fp, **results[j.label].info} for j in listed]


@dataclass
class _ExportPlan:
    """What every export of a run shares: the quality text or windows, the 4-bit calibration, the context."""

    max_context: int
    quality_file: Path | None
    quality_tokens: Path | None
    calib_windows: Path | None
    threads: int = 1


def _export_plan(state: RunState, models: list[ModelEntry], quality_file: Path | None, quality_fp: str | None,
                 calib: StageResult | None, heldout: StageResult | None) -> tuple[_ExportPlan, list[_ExportJob]]:
    """Decide what each artifact is measured and calibrated on, and list the exports with their fingerprints."""
    cfg = state.cfg
    x = cfg["export"]
    # each artifact's quality is measured through its runtime on the evaluation text, else on the held-out text
    # the dense model wrote (one text for every artifact, sampled once) where it is long enough, else on text
    # each model writes itself; a 4-bit export whose recipe calibrates (the CLI's default one) does so on the
    # run's calibration windows
    ev = cfg["evaluate"]
    quality_tokens = None
    if quality_file is None and heldout is not None and heldout_measures_quality(
            (ev["agreement_samples"], ev["agreement_seqlen"]), x["max_context"]):
        quality_tokens = heldout.folder / "windows.pt"
    quality = {"quality_text": quality_fp} if quality_tokens is None else {"quality_tokens": heldout.fingerprint}
    if not DEFAULT_RECIPE.calibrated:
        calib = None
    calib_windows = calib.folder / "windows.pt" if calib is not None else None
    jobs = [_ExportJob(f"{m.label}-{a}", m, a, cfg.folder / "bundles" / f"{m.label}-{a}",
                       fingerprint({"artifact": a, "max_context": x["max_context"], **quality},
                                   [m.fingerprint] + ([calib.fingerprint] if calib and BY_KEY[a].quant in CALIBRATED_QUANTS else [])))
            for m in models for a in (x["dense_artifacts"] if m.path is None else x["artifacts"])]
    return _ExportPlan(x["max_context"], quality_file, quality_tokens, calib_windows), jobs


def _export_one(state: RunState, plan: _ExportPlan, job: _ExportJob, children: "_Children") -> StageResult:
    """One bundle, by ``fasp-edge export`` in a child process (reused where its fingerprint is unchanged)."""
    cfg = state.cfg
    kind = BY_KEY[job.artifact]
    fmt, quant = kind.format, kind.quant

    def build(tmp: Path) -> dict:
        if job.model.path is not None:
            src = [str(job.model.path.resolve())]
        else:
            source, gguf = source_args(cfg)
            src = ([source] if source else []) + (["--gguf-file", gguf] if gguf else [])
            src += ["--trust-remote-code"] if cfg["model"]["trust_remote_code"] else []
        work = tmp / "bundle"
        cmd = [sys.executable, "-m", "fasp_edge.cli", "-q", "export", *src, "--formats", fmt, "--quant", quant,
               "--max-context", str(plan.max_context), "-o", str(work)]
        if plan.quality_file:
            cmd += ["--quality-text", str(plan.quality_file)]
        elif plan.quality_tokens is not None:
            cmd += ["--quality-tokens", str(plan.quality_tokens)]
        if quant in CALIBRATED_QUANTS and plan.calib_windows is not None:
            cmd += ["--calib-windows", str(plan.calib_windows)]
        log_file = tmp / "export.log"
        rc = children.run(cmd, _child_env(plan.threads), log_file)
        if rc != 0:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-5:] if log_file.exists() else []
            raise RunError(f"export of {job.label} failed (exit {rc}): " + " / ".join(tail))
        for f in work.iterdir():
            os.replace(f, tmp / f.name)
        work.rmdir()
        log_file.unlink(missing_ok=True)
        manifest = json.loads((tmp / "manifest.json").read_text())
        return {"bytes": sum(f["bytes"] for f in manifest["files"].values()),
                "model_bytes": artifact_bytes(manifest, fmt),
                "parity_max_abs_diff": manifest["parity"][fmt]["max_abs_diff"],
                "greedy_token_agreement": manifest["parity"][fmt]["greedy_token_agreement"],
                "quality": manifest.get("quality", {}).get(fmt),
                "export_seconds": manifest["artifacts"][fmt]["export_seconds"]}

    return run_stage(job.label, job.folder, job.fp, build, force="export" in state.force)


def _run_exports(state: RunState, jobs: list[_ExportJob], workers: int, one) -> dict[str, StageResult]:
    """Run ``one(job, children)`` for every job, ``workers`` at a time, with a progress bar of the running ones; a
    failed export starts no other but lets the running ones finish (and be kept); an interrupt stops them all."""
    children = _Children()
    results: dict[str, StageResult] = {}
    for job in jobs:
        state.announce("export", f"{job.label} ({job.artifact})")
    started: dict[str, float] = {}

    def start(job: _ExportJob) -> StageResult:
        started[job.label] = time.time()
        return one(job, children)

    bar = tqdm(total=len(jobs), desc="export", unit="bundle", disable=not state.progress, leave=False)
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    errors: list[str] = []
    try:
        futures = {pool.submit(start, job): job for job in jobs}
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=2.0,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                job = futures[f]
                if f.cancelled():
                    continue
                try:
                    res = f.result()
                except RunError as e:
                    # a failed export: start no other, but let the running ones finish (and be kept)
                    errors.append(str(e))
                    log.error("    %s", e)
                    for g in pending:
                        g.cancel()
                    continue
                results[job.label] = state.record(res, "export", job.label)
                bar.update(1)
            running = [j.label for j in jobs if j.label in started and j.label not in results]
            bar.set_postfix_str(", ".join(f"{r} {time.time() - started[r]:.0f}s" for r in running), refresh=False)
    except BaseException:
        # an interrupt: stop every export first (their folders stay temporary and are removed), then wait for
        # their threads
        children.kill_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    if errors:
        raise RunError(f"{len(errors)} export(s) failed (the finished ones are kept; run again to retry): "
                       + " | ".join(errors))
    return results


# ---------------------------------------------------------------------------------------- bench
def _bench(state: RunState, bundles: list[dict], profiles, host: dict) -> dict | None:
    if not bundles:
        return None
    cfg = state.cfg
    b = cfg["bench"]
    # what the figures depend on: the settings, the profiles' numbers (not their prose) and the host
    settings = {k: b[k] for k in ("backends", "reps", "warmup", "rounds")} | {
        "profiles": [{k: v for k, v in p.to_dict().items() if k not in ("note", "source", "description")}
                     for p in profiles],
        "host": {k: host.get(k) for k in ("cpu_model", "logical_cpus", "usable_cpus", "os", "arch", "versions")}}
    # the dense bundles first: every row is compared with the first dense bundle of its backend
    order = sorted(bundles, key=lambda x: (x["model"] != "dense", BY_KEY[x["artifact"]].quant != "none"))
    fp = fingerprint(settings, [x["fingerprint"] for x in order])

    def build(tmp: Path) -> dict:

        doc = run_bench([x["path"] for x in order], profiles, b["backends"], reps=b["reps"], warmup=b["warmup"],
                        rounds=b["rounds"], progress=state.progress, omit_missing=True)
        write_report(doc, tmp, overwrite=True)
        ok = sum(r["status"] == "ok" for r in doc["results"])
        failed = [f"{r['bundle']} / {r['backend']} / {r['profile']}: {r['reason']}" for r in doc["results"]
                  if r["status"] == "failed"]
        info = {"rows": len(doc["results"]), "measured": ok}
        if failed:  # shown in the report now, measured again by the next run
            log.warning("    %d measurement(s) failed; the next run measures again: %s", len(failed), "; ".join(failed))
            info["incomplete"] = f"{len(failed)} measurement(s) failed"
        return info

    per_profile = sum(BY_KEY[x["artifact"]].format in b["backends"] for x in order) + (
        len({x["model"] for x in order}) if "torch" in b["backends"] else 0)
    res = state.stage("bench", f"{len(order)} bundles on {', '.join(b['backends'])} under {len(profiles)} profile(s) "
                      f"({', '.join(p.name for p in profiles)}): {per_profile * len(profiles)} measurements, "
                      f"{b['rounds']} round(s)", cfg.folder / "bench", fp, build)
    return {"folder": str(res.folder), **res.info}

