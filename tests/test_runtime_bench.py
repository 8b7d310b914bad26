"""runtime_bench: device profiles, the per-process measurement, comparisons, the report and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from fasp_edge.cli import main
from fasp_edge.errors import InvalidArgument
from fasp_edge.runtime_bench.harness import load_targets, optimum_target, run_bench, run_measurement
from fasp_edge.runtime_bench.measure import THREAD_ENV_VARS, plan_cpus, thread_env
from fasp_edge.runtime_bench.profiles import Profile, ProfileError, builtin_profiles, load_profile_file, resolve_profiles
from fasp_edge.runtime_bench.report import schema, validate, write_report
from fasp_edge.versions import library_versions

from .conftest import STORIES, requires_shared

TINY = Profile(name="tiny", description="test", threads=1, memory_budget_mb=4096, context_length=128, prompt_tokens=12,
               generate_tokens=8, note="for tests")


def _profile_file(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


GOOD = """name = "mine"
description = "my board"
threads = 1
memory_budget_mb = 4096
context_length = 128
prompt_tokens = 12
generate_tokens = 8
note = "a test board"
"""


# ---------------------------------------------------------------- profiles (point 1)
def test_builtin_profiles_load_and_validate():
    profs = builtin_profiles()
    assert {"phone-flagship", "phone-mid", "hub", "rpi4", "rpi5"} <= set(profs)
    for p in profs.values():
        assert p.threads >= 1 and p.memory_budget_mb >= 1 and p.prompt_tokens + p.generate_tokens <= p.context_length
        assert p.cpu_affinity in ("first", "all") or isinstance(p.cpu_affinity, tuple)
        assert len(p.note) > 80, f"{p.name}: the note must name the device class and where its figures come from"
    assert profs["hub"].memory_budget_mb < profs["phone-mid"].memory_budget_mb < profs["phone-flagship"].memory_budget_mb


def test_profile_file_of_the_user(tmp_path):
    prof = load_profile_file(_profile_file(tmp_path, GOOD))
    assert (prof.name, prof.threads, prof.memory_budget_mb) == ("mine", 1, 4096)
    got = resolve_profiles(["hub", "mine"], [str(tmp_path / "p.toml")])
    assert [p.name for p in got] == ["hub", "mine"]
    assert [p.name for p in resolve_profiles([], [str(tmp_path / "p.toml")])] == ["mine"]


@pytest.mark.parametrize("edit, message", [
    (GOOD + "colour = 'red'\n", "unknown key 'colour'"),
    (GOOD.replace("threads = 1", "threads = 'four'"), "'threads' must be a whole number"),
    (GOOD.replace("threads = 1", "threads = 0"), "'threads' must be a whole number >= 1"),
    (GOOD.replace("memory_budget_mb = 4096\n", ""), "missing key 'memory_budget_mb'"),
    (GOOD.replace("prompt_tokens = 12", "prompt_tokens = 200"), "exceed context_length"),
    (GOOD + "cpu_affinity = 'fast'\n", "'cpu_affinity' must be"),
    ("name = [", "not a readable TOML file"),
])
def test_bad_profile_files_name_the_key_and_the_file(tmp_path, edit, message):
    f = _profile_file(tmp_path, edit)
    with pytest.raises(ProfileError, match=message) as e:
        load_profile_file(f)
    assert str(f) in str(e.value)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(InvalidArgument, match="unknown profile 'watch'.*hub.*--profile-file"):
        resolve_profiles(["watch"])


def test_profiles_command_lists_them(capsys):
    assert main(["profiles", "-v"]) == 0
    out = capsys.readouterr().out
    for name in ("phone-flagship", "phone-mid", "hub", "rpi4", "rpi5"):
        assert name in out
    assert "raspberrypi.com" in out


def test_plan_cpus_clamps_and_says_so():
    cpus, threads, notes = plan_cpus(4, "first", [0, 1])
    assert (cpus, threads) == ([0, 1], 2) and "asks for 4" in notes[0]
    cpus, threads, notes = plan_cpus(1, [1, 7], [0, 1])
    assert (cpus, threads) == ([1], 1) and "[7]" in notes[0]
    assert plan_cpus(2, "all", [0, 1, 2]) == ([0, 1, 2], 2, [])


def test_torch_pool_is_sized_in_the_childs_starting_environment():
    # beside another runtime torch gets one OpenMP thread; on the torch backend the profile's, as clamped
    assert thread_env("pte", 4, "first", [0, 1]) == {v: "1" for v in THREAD_ENV_VARS}
    assert thread_env("onnx", 2, "all", [0, 1, 2]) == {v: "1" for v in THREAD_ENV_VARS}
    assert thread_env("torch", 4, "first", [0, 1]) == {v: "2" for v in THREAD_ENV_VARS}
    assert thread_env("torch", 1, [1], [0, 1]) == {v: "1" for v in THREAD_ENV_VARS}


# ---------------------------------------------------------------- the measurement (points 2, 3)
@pytest.mark.slow
@requires_shared(STORIES)
@pytest.mark.parametrize("backend", ["pte", "onnx", "torch"])
def test_threads_are_applied_inside_the_child(stories_bundles, backend):
    target = load_targets([str(stories_bundles["dense"][0])])[0]
    res = run_measurement(target, backend, TINY, reps=1, warmup=0, torch_model=str(STORIES))
    assert res["status"] == "ok", res
    applied = res["applied"]
    assert applied["threads"] == 1 and applied["torch_threads"] == 1
    assert applied["thread_env_at_torch_load"] == {v: "1" for v in THREAD_ENV_VARS}  # set before torch loaded
    assert applied["modules_before_profile"] == []
    assert not any("when torch loaded" in n for n in res["not_applied"])
    if hasattr(os, "sched_getaffinity"):
        assert applied["cpu_affinity"] == sorted(os.sched_getaffinity(0))[:1]
    if backend == "pte":
        assert applied["executorch_threadpool"] == 1
    if backend == "onnx":
        assert (applied["ort_intra_op_threads"], applied["ort_inter_op_threads"], applied["ort_spinning"]) == (1, 1, False)


@pytest.mark.slow
@requires_shared(STORIES)
def test_the_child_applies_its_profile_before_torch_loads(stories_bundles, monkeypatch):
    """Started with no thread variable at all, the measuring child sets them itself before torch loads: nothing
    heavy is imported before its profile is applied (``python -m`` runs both package ``__init__`` files first)."""
    import fasp_edge.runtime_bench.harness as harness

    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(harness, "thread_env", lambda *args: {})
    target = load_targets([str(stories_bundles["dense"][0])])[0]
    res = run_measurement(target, "torch", TINY, reps=1, warmup=0, torch_model=str(STORIES))
    assert res["status"] == "ok", res
    assert res["applied"]["modules_before_profile"] == []
    assert res["applied"]["thread_env_at_torch_load"] == {v: "1" for v in THREAD_ENV_VARS}
    assert res["applied"]["torch_threads"] == 1
    assert not any("when torch loaded" in n for n in res["not_applied"])


@pytest.mark.slow
@requires_shared(STORIES)
def test_more_threads_than_cpus_is_recorded_not_hidden(stories_bundles):
    target = load_targets([str(stories_bundles["dense"][0])])[0]
    many = Profile(**{**TINY.to_dict(), "threads": 512, "cpu_affinity": "first"})
    res = run_measurement(target, "pte", many, reps=1, warmup=0)
    assert res["status"] == "ok"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert res["applied"]["threads"] == usable == res["applied"]["executorch_threadpool"]
    assert any("asks for 512" in n for n in res["not_applied"])


@pytest.fixture(scope="module")
def bench_doc(stories_bundles, tmp_path_factory):
    """One bench over dense + FASP stories260K bundles, all backends, two profiles (one over its budget)."""
    tmp = tmp_path_factory.mktemp("bench")
    small = Profile(**{**TINY.to_dict(), "name": "small", "threads": 2, "memory_budget_mb": 1})
    doc = run_bench([str(stories_bundles["dense"][0]), str(stories_bundles["fasp"][0])], [TINY, small],
                    ["pte", "onnx", "torch"], reps=2, warmup=1, progress=False)
    out = write_report(doc, tmp / "results")
    return doc, out


@pytest.mark.slow
@requires_shared(STORIES)
def test_every_backend_gives_every_metric(bench_doc):
    doc, _ = bench_doc
    rows = {(r["bundle"], r["backend"], r["profile"]): r for r in doc["results"]}
    assert len(rows) == 2 * 3 * 2
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r["reason"])
        for metric in ("load_s", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
            s = r["metrics"][metric]
            assert 0 < s["min"] <= s["median"] <= s["max"], (key, metric, s)
        assert r["metrics"]["decode_tokens_per_s"]["n"] == 2
        assert r["prompt_tokens"] == 12 and r["generated_tokens"] == 8
        assert r["memory"]["peak_rss_mb"] >= r["memory"]["model_rss_mb"] > 0 and r["artifact_bytes"] > 0
    host = doc["host"]
    assert host["cpu_model"] and host["arch"] and host["os"] and host["logical_cpus"] >= 1
    assert host["versions"] == library_versions()  # what is installed, from the one list manifests record too


@pytest.mark.slow
@requires_shared(STORIES)
def test_pruned_rows_are_compared_with_the_dense_bundle(bench_doc):
    doc, _ = bench_doc
    for r in doc["results"]:
        if r["bundle"] == "dense":
            assert r["vs_dense"] is None
            continue
        v = r["vs_dense"]
        assert v["reference"] == "dense"
        dense = next(x for x in doc["results"] if x["bundle"] == "dense" and x["backend"] == r["backend"]
                     and x["profile"] == r["profile"])
        want = r["metrics"]["decode_tokens_per_s"]["median"] / dense["metrics"]["decode_tokens_per_s"]["median"]
        assert v["decode_speedup"] == pytest.approx(want, rel=1e-3)
        assert v["size_ratio"] < 0.95  # FASP-0.3 artifacts are smaller


@pytest.mark.slow
@requires_shared(STORIES)
def test_memory_budget_is_a_verdict_not_a_crash(bench_doc):
    doc, _ = bench_doc
    verdicts = {r["profile"]: r["memory"]["verdict"] for r in doc["results"]}
    assert verdicts == {"tiny": "within budget", "small": "over budget"}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited high-water mark is a Linux exec trait")
def test_peak_memory_is_the_measuring_process_own_not_its_parents():
    """ru_maxrss survives exec: a measurement started from a big process (`fasp-edge run` after pruning) once
    reported the parent's 2 GB for every row. The child's figure must not carry ours."""
    big = bytearray(1200 * 2**20)
    big[::4096] = b"\1" * len(big[::4096])  # touch every page
    code = "from fasp_edge.runtime_bench.measure import _peak_rss_mb; print(_peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child_peak = float(out.stdout)
    assert child_peak < 1000, child_peak  # the import alone takes ~0.4 GB
    del big


@pytest.mark.slow
@requires_shared(STORIES)
def test_json_follows_the_documented_schema_and_plots_are_written(bench_doc):
    doc, out = bench_doc
    on_disk = json.loads((out / "bench.json").read_text())
    validate(on_disk)
    broken = json.loads(json.dumps(on_disk))
    del broken["results"][0]["metrics"]["decode_tokens_per_s"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    for png in ("decode_tokens_per_s.png", "peak_memory_mb.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (out / "bench.md").read_text()
    assert md.index("Against the dense bundle") < md.index("## Measurements")  # ratios lead
    assert "over budget" in json.dumps(on_disk) and "**over**" in md
    assert "README" not in schema()["title"]


# ---------------------------------------------------------------- optimum's ONNX export as the reference
@pytest.mark.slow
@requires_shared(STORIES)
def test_optimum_onnx_export_is_measured_as_the_reference(stories_bundles, tmp_path):
    out = tmp_path / "optimum"
    proc = subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "-m", str(STORIES),
                           "--task", "text-generation-with-past", str(out)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    import torch

    from fasp_edge.runtime.onnx import OnnxModel

    ours = OnnxModel(stories_bundles["dense"][0] / "model.onnx")
    theirs = OnnxModel(out / "model.onnx")
    ids = torch.arange(5, 25)
    assert (ours.step(ids, 0) - theirs.step(ids, 0)).abs().max() < 1e-4
    assert (ours.step(torch.tensor([3]), 20) - theirs.step(torch.tensor([3]), 20)).abs().max() < 1e-4
    doc = run_bench([str(stories_bundles["dense"][0])], [TINY], ["onnx", "pte"], reps=2, warmup=0, rounds=2,
                    optimum_onnx=[str(out)], progress=False)
    validate(doc)
    pooled = next(r for r in doc["results"] if r["bundle"] == "dense" and r["backend"] == "pte")
    assert pooled["rounds"] == 2 and pooled["metrics"]["decode_tokens_per_s"]["n"] == 4
    assert pooled["metrics"]["load_s"]["n"] == 2  # one cold load per fresh process
    ref = next(r for r in doc["results"] if r["bundle"] == "optimum")
    assert ref["status"] == "ok" and ref["vs_dense"] is None
    skipped = next(r for r in doc["results"] if r["bundle"] == "optimum" and r["backend"] == "pte")
    assert skipped["status"] == "skipped" and "no pte artifact" in skipped["reason"]
    mine = next(r for r in doc["results"] if r["bundle"] == "dense" and r["backend"] == "onnx")
    assert mine["vs_optimum"]["reference"] == "optimum" and mine["vs_optimum"]["decode_speedup"] > 0
    with pytest.raises(InvalidArgument, match="optimum ONNX export folder"):
        optimum_target(tmp_path)


# ---------------------------------------------------------------- bad input (point 7)
def _run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fasp_edge.cli", "-q", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
@requires_shared(STORIES)
@pytest.mark.parametrize("args, message", [
    (["--backends", "tflite"], "unknown backend tflite; choose from pte, onnx, torch"),
    (["--profiles", "watch"], "unknown profile 'watch'"),
])
def test_unknown_backend_or_profile(stories_bundles, tmp_path, args, message):
    proc = _run_cli(["bench", str(stories_bundles["dense"][0]), *args, "-o", str(tmp_path / "res")])
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
@requires_shared(STORIES)
def test_damaged_bundle_is_refused_before_measuring(stories_bundles, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(stories_bundles["dense"][0], bad)
    with open(bad / "model.pte", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = _run_cli(["bench", str(bad), "-o", str(tmp_path / "res")])
    assert proc.returncode == 2 and "model.pte does not match its sha256" in proc.stderr
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
@requires_shared(STORIES)
def test_missing_backend_library_is_skipped_and_others_run(stories_bundles, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "onnxruntime.py").write_text("raise ImportError('onnxruntime is hidden for this test')\n")
    prof = _profile_file(tmp_path, GOOD)
    env = {"PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    proc = _run_cli(["bench", str(stories_bundles["dense"][0]), "--profile-file", str(prof), "--backends", "pte,onnx",
                     "--reps", "1", "-o", str(tmp_path / "res")], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["backend"]: r for r in json.loads((tmp_path / "res" / "bench.json").read_text())["results"]}
    assert rows["pte"]["status"] == "ok"
    assert rows["onnx"]["status"] == "skipped" and "onnxruntime cannot be imported" in rows["onnx"]["reason"]
    assert "onnxruntime cannot be imported" in (tmp_path / "res" / "bench.md").read_text()


@pytest.mark.slow
@requires_shared(STORIES)
def test_torch_backend_refuses_a_different_model(stories_bundles, tmp_path):
    target = load_targets([str(stories_bundles["fasp"][0])])[0]
    res = run_measurement(target, "torch", TINY, reps=1, warmup=0, torch_model=str(STORIES))
    assert res["status"] == "skipped" and "not the one this bundle was exported from" in res["reason"]


def test_one_pytorch_model_gets_one_torch_row_however_its_bundles_name_it():
    """Two bundles of the same weights, one recording a relative folder and one an absolute one: one torch row per
    profile, the other skipped; other weights get their own row."""
    from pathlib import Path

    from fasp_edge.runtime.bundle import Bundle
    from fasp_edge.runtime_bench.harness import Target, plan

    def target(label, source, sha):
        return Target(label, Bundle(Path(label), {"model": {"source": source, "weights_sha256": sha},
                                                  "artifacts": {"pte": {}}}))

    targets = [target("q4", "/w/out/fasp", "a" * 64), target("q4-asym", "out/fasp", "a" * 64),
               target("dense", "/w/dense", "b" * 64)]
    jobs = [(kind, t.label) for kind, t, backend, _profile, _ in plan(targets, ["torch"], [TINY]) if backend == "torch"]
    assert jobs == [("run", "q4"), ("skip", "q4-asym"), ("run", "dense")]


def test_quantized_rows_are_compared_like_with_like():
    """A pruned 4-bit bundle is compared with the dense 4-bit one; the ratio to dense fp32 is kept apart."""
    from pathlib import Path

    from fasp_edge.runtime.bundle import Bundle
    from fasp_edge.runtime_bench.harness import Target, add_comparisons

    def target(label, pruned, quant):
        return Target(label, Bundle(Path(label), {"model": {"fasp": {"sparsity": 0.3} if pruned else None},
                                                  "quantization": quant}))

    targets = [target("dense", False, "none"), target("dense-q4", False, "8da4w"), target("fasp", True, "none"),
               target("fasp-q4", True, "8da4w")]
    speed = {"dense": 20.0, "dense-q4": 60.0, "fasp": 25.0, "fasp-q4": 75.0}

    def row(label):
        med = lambda v: {"median": v}  # noqa: E731
        return {"bundle": label, "backend": "pte", "profile": "hub", "status": "ok", "artifact_bytes": 100,
                "metrics": {"decode_tokens_per_s": med(speed[label]), "prefill_tokens_per_s": med(1.0),
                            "ttft_s": med(1.0), "load_s": med(1.0)},
                "memory": {"model_rss_mb": 10.0, "peak_rss_mb": 20.0}}

    rows = [row(t.label) for t in targets]
    add_comparisons(rows, targets)
    by = {r["bundle"]: r for r in rows}
    assert by["fasp-q4"]["vs_dense"]["reference"] == "dense-q4"
    assert by["fasp-q4"]["vs_dense"]["decode_speedup"] == pytest.approx(1.25)
    assert by["fasp-q4"]["vs_dense_fp32"]["reference"] == "dense"  # across precisions, apart
    assert by["fasp"]["vs_dense"]["reference"] == "dense" and "vs_dense_fp32" not in by["fasp"]
    assert by["dense-q4"]["vs_dense"] is None and by["dense-q4"]["vs_dense_fp32"]["decode_speedup"] == 3.0


def test_quantized_rows_are_compared_within_their_recipe():
    """Two dense 4-bit bundles of different weight grids: each pruned 4-bit bundle is set against the one of its own
    recipe, whichever comes first."""
    from pathlib import Path

    from fasp_edge.runtime.bundle import Bundle
    from fasp_edge.runtime_bench.harness import Target, add_comparisons

    def target(label, pruned, qparams):
        return Target(label, Bundle(Path(label), {"model": {"fasp": {"sparsity": 0.3} if pruned else None},
                                                  "quantization": "8da4w",
                                                  "export_settings": {"recipe": {"qparams": qparams}}}))

    targets = [target("dense-asym", False, "asymmetric"), target("dense-gptq", False, "gptq"),
               target("fasp-gptq", True, "gptq"), target("fasp-asym", True, "asymmetric")]
    med = lambda v: {"median": v}  # noqa: E731
    rows = [{"bundle": t.label, "backend": "pte", "profile": "hub", "status": "ok", "artifact_bytes": 100,
             "metrics": {"decode_tokens_per_s": med(10.0 + i), "prefill_tokens_per_s": med(1.0), "ttft_s": med(1.0),
                         "load_s": med(1.0)}, "memory": {"model_rss_mb": 10.0, "peak_rss_mb": 20.0}}
            for i, t in enumerate(targets)]
    add_comparisons(rows, targets)
    by = {r["bundle"]: r for r in rows}
    assert by["fasp-gptq"]["vs_dense"]["reference"] == "dense-gptq"
    assert by["fasp-asym"]["vs_dense"]["reference"] == "dense-asym"


def test_compared_rows_run_back_to_back_and_speedups_are_taken_round_by_round():
    """Within a round a pruned row runs right after (or, every other round, right before) the dense row of its own
    backend and precision; a decode speed-up is the median of the per-round ratios, so a machine that slows down
    between rounds does not move it."""
    from pathlib import Path

    from fasp_edge.runtime.bundle import Bundle
    from fasp_edge.runtime_bench.harness import Target, add_comparisons, merge_rounds, run_order

    def target(label, pruned, quant):
        return Target(label, Bundle(Path(label), {"model": {"fasp": {"sparsity": 0.3} if pruned else None},
                                                  "quantization": quant, "formats": ["pte"]}))

    targets = [target("dense", False, "none"), target("dense-q4", False, "8da4w"), target("fasp", True, "none"),
               target("fasp-q4", True, "8da4w")]
    hub, mid = Profile(**{**TINY.to_dict(), "name": "hub"}), Profile(**{**TINY.to_dict(), "name": "mid"})
    jobs = [("run", t, "pte", p, None) for p in (hub, mid) for t in targets]
    names = lambda order: [(jobs[i][3].name, jobs[i][1].label) for i in order]  # noqa: E731
    first = names(run_order(jobs, list(range(len(jobs))), 0))
    assert first[:4] == [("hub", "dense"), ("hub", "fasp"), ("hub", "dense-q4"), ("hub", "fasp-q4")]
    assert first[4:] == [("mid", "dense"), ("mid", "fasp"), ("mid", "dense-q4"), ("mid", "fasp-q4")]
    assert names(run_order(jobs, list(range(len(jobs))), 1)) == first[::-1]

    def measured(label, speeds):  # one result per round, the machine twice as slow in round 2
        med = lambda v: {"median": v, "min": v, "max": v, "n": 1, "values": [v]}  # noqa: E731
        return merge_rounds([{"bundle": label, "backend": "pte", "profile": "hub", "status": "ok", "not_applied": [],
                              "artifact_bytes": 100, "memory": {"model_rss_mb": 10.0, "peak_rss_mb": 20.0},
                              "metrics": {"decode_tokens_per_s": med(v), "prefill_tokens_per_s": med(1.0),
                                          "ttft_s": med(1.0), "load_s": med(1.0)}} for v in speeds])

    rows = [measured("dense", [100.0, 50.0, 100.0]), measured("fasp", [120.0, 60.0, 121.0])]
    add_comparisons(rows, targets)
    v = rows[1]["vs_dense"]
    assert rows[1]["round_decode_tokens_per_s"] == [120.0, 60.0, 121.0]
    assert v["decode_speedup"] == pytest.approx(1.20)  # median of 1.20, 1.20, 1.21
    assert v["decode_speedup_pooled"] == pytest.approx(1.20)  # pooled medians: 120 / 100
