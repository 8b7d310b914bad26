"""Cached, resumable stages: skip what is done, redo what changed, survive being killed at any moment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from fasp_edge.job.stages import fingerprint, read_record, run_stage


def _writer(calls: list):
    def build(tmp):
        calls.append(1)
        (tmp / "out.txt").write_text("result")
        return {"rows": 3}
    return build


def test_fingerprint_is_stable_and_sensitive():
    a = fingerprint({"sparsity": 0.2, "method": "fasp"}, ["abc"])
    assert a == fingerprint({"method": "fasp", "sparsity": 0.2}, ["abc"])  # key order does not matter
    assert a != fingerprint({"sparsity": 0.3, "method": "fasp"}, ["abc"])
    assert a != fingerprint({"sparsity": 0.2, "method": "fasp"}, ["abd"])  # an upstream stage changed


def test_done_stage_is_skipped_changed_or_forced_stage_is_redone(tmp_path):
    calls: list = []
    folder = tmp_path / "run" / "prune"
    first = run_stage("prune", folder, "fp1", _writer(calls))
    assert not first.skipped and first.info == {"rows": 3} and (folder / "out.txt").read_text() == "result"
    assert read_record(folder)["fingerprint"] == "fp1"
    again = run_stage("prune", folder, "fp1", _writer(calls))
    assert again.skipped and again.info == {"rows": 3} and len(calls) == 1
    run_stage("prune", folder, "fp2", _writer(calls))
    assert len(calls) == 2 and read_record(folder)["fingerprint"] == "fp2"
    run_stage("prune", folder, "fp2", _writer(calls), force=True)
    assert len(calls) == 3


def test_a_failing_stage_leaves_the_previous_output(tmp_path):
    folder = tmp_path / "export"
    run_stage("export", folder, "fp1", _writer([]))

    def broken(tmp):
        (tmp / "out.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage("export", folder, "fp2", broken)
    assert (folder / "out.txt").read_text() == "result" and read_record(folder)["fingerprint"] == "fp1"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    with pytest.raises(RuntimeError):
        run_stage("fresh", tmp_path / "fresh", "fp1", broken)
    assert not (tmp_path / "fresh").exists()


CHILD = """
import sys, time
from pathlib import Path
from fasp_edge.job.stages import run_stage
def build(tmp):
    (tmp / "part.bin").write_bytes(b"x" * 1000)
    print("building", flush=True)
    time.sleep(60)
run_stage("slow", Path(sys.argv[1]), "fp", build)
"""


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_finishes_cleanly(tmp_path):
    folder = tmp_path / "slow"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not folder.exists()
    assert any(p.name.startswith(".slow.tmp-") for p in tmp_path.iterdir())  # what a SIGKILL leaves behind
    res = run_stage("slow", folder, "fp", _writer([]))
    assert not res.skipped and (folder / "out.txt").is_file() and not (folder / "part.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["slow"]  # the stale temporary folder is gone
    record = json.loads((folder / "stage.json").read_text())
    assert record["complete"] and record["stage"] == "slow" and record["seconds"] >= 0


def test_an_incomplete_stage_is_shown_but_built_again(tmp_path):
    calls: list = []

    def flaky(tmp):
        calls.append(1)
        (tmp / "bench.json").write_text("{}")
        return {"incomplete": "1 measurement(s) failed"} if len(calls) == 1 else {"rows": 2}

    first = run_stage("bench", tmp_path / "bench", "fp", flaky)
    assert (tmp_path / "bench" / "bench.json").is_file() and read_record(tmp_path / "bench")["complete"] is False
    second = run_stage("bench", tmp_path / "bench", "fp", flaky)
    assert not second.skipped and len(calls) == 2 and read_record(tmp_path / "bench")["complete"] is True
    assert run_stage("bench", tmp_path / "bench", "fp", flaky).skipped and first.info["incomplete"]


def test_force_takes_every_later_stage_along():
    from fasp_edge.job.run import forced_stages

    assert forced_stages(["prune"]) == {"prune", "evaluate", "export", "bench", "report"}
    assert forced_stages(["bench", "evaluate"]) == {"evaluate", "export", "bench", "report"}
    assert forced_stages([]) == set()
