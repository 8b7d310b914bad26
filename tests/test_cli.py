"""The command line: the happy path, and every bad input giving a one-line error and no output."""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fasp_edge.cli import main

from .conftest import STORIES, TINYSTORIES, default_sigint, requires_shared

needs_stories = requires_shared(STORIES, TINYSTORIES)


def run_cli(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fasp-edge: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def assert_nothing_written(parent: Path, name: str):
    leftovers = [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
    assert leftovers == [], leftovers


PRUNE = ["prune", STORIES, "--calib-file", TINYSTORIES, "--nsamples", "8", "--seqlen", "64"]


@pytest.mark.slow
@needs_stories
def test_prune_then_eval(tmp_path, capsys):
    out = tmp_path / "s30"
    code, stdout, err = run_cli(capsys, *PRUNE, "--sparsity", "0.3", "--align", "2", "-o", out)
    assert code == 0, err
    assert "260,032 ->" in stdout
    report = json.loads((out / "fasp_report.json").read_text())
    for key in ("params_before", "params_after", "nonembedding_params_before", "nonembedding_params_after",
                "seconds", "method", "sparsity"):
        assert key in report
    assert report["params_after"] < report["params_before"] and report["method"] == "fasp"
    # the default refit: λ per pair on held-out windows, damped toward the kept weights, OBS selection
    assert (report["damp"], report["refit_prior"], report["selection"]) == ("auto", "original", "obs")
    assert len(report["damp_chosen"]["mlp"]) == 5
    fasp = json.loads((out / "config.json").read_text())["fasp"]
    assert (fasp["damp"], fasp["refit_prior"], fasp["selection"]) == ("auto", "original", "obs")
    assert fasp["ffn_dims"] == [122] * 5 and fasp["v_head_dims"] == [6] * 5  # 121 aligned to 2
    assert fasp["calibration"]["file"] == TINYSTORIES.name and len(fasp["source_model"]["sha256"]) == 64
    assert fasp["method"] == "fasp" and fasp["sparsity"] == 0.3

    code, stdout, err = run_cli(capsys, "eval", out, "--text-file", TINYSTORIES, "--seqlen", "128",
                                "--max-windows", "10", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["windows"] == 10 and res["tokens"] == 1280 and 1 < res["perplexity"] < 100


@pytest.mark.slow
@needs_stories
def test_prune_with_auto_damping_toward_the_original_weights(tmp_path, capsys):
    out = tmp_path / "auto"
    code, _, err = run_cli(capsys, *PRUNE, "--sparsity", "0.3", "--damp", "auto", "--refit-prior", "original",
                           "--sequential-stats", "--selection", "obs", "-o", out)
    assert code == 0, err
    report = json.loads((out / "fasp_report.json").read_text())
    assert report["damp"] == "auto" and report["refit_prior"] == "original" and report["selection"] == "obs"
    assert len(report["damp_chosen"]["mlp"]) == 5 and all(d > 0 for d in report["damp_chosen"]["attn"])
    fasp = json.loads((out / "config.json").read_text())["fasp"]
    assert fasp["damp"] == "auto" and fasp["refit_prior"] == "original" and fasp["sequential_statistics"]
    assert fasp["selection"] == "obs"
    assert report["sequential_statistics"] is True
    code, _, err = run_cli(capsys, *PRUNE, "--sparsity", "0.3", "--method", "wanda-sp", "--selection", "obs",
                           "-o", tmp_path / "w")
    assert_one_line_error(code, err, "--selection obs")
    assert_nothing_written(tmp_path, "w")
    # the default --damp auto needs windows to hold out: said before the model loads, with what to give instead
    code, _, err = run_cli(capsys, "prune", STORIES, "--calib-file", TINYSTORIES, "--nsamples", "3", "--seqlen", "64",
                           "--sparsity", "0.3", "-o", tmp_path / "few")
    assert_one_line_error(code, err, "--nsamples 4 or more, or a number for --damp")
    assert_nothing_written(tmp_path, "few")
    # the earlier refit stays reachable, and wanda-sp's default selection is its score
    code, _, err = run_cli(capsys, *PRUNE, "--sparsity", "0.3", "--damp", "0.01", "--refit-prior", "zero",
                           "--selection", "score", "-o", tmp_path / "old")
    assert code == 0, err
    old = json.loads((tmp_path / "old" / "fasp_report.json").read_text())
    assert (old["damp"], old["refit_prior"], old["selection"]) == (0.01, "zero", "score") and "damp_chosen" not in old
    code, _, err = run_cli(capsys, *PRUNE, "--sparsity", "0.3", "--method", "wanda-sp", "-o", tmp_path / "wsp")
    assert code == 0, err
    assert json.loads((tmp_path / "wsp" / "fasp_report.json").read_text())["selection"] == "score"
    with pytest.raises(SystemExit):  # argparse: usage, then the one-line reason
        run_cli(capsys, *PRUNE, "--sparsity", "0.3", "--damp", "lots", "-o", tmp_path / "x")
    assert "expected a number >= 0 or 'auto'" in capsys.readouterr().err
    assert_nothing_written(tmp_path, "x")


@pytest.mark.slow
@needs_stories
def test_prune_without_text_calibrates_on_self_generated_text(tmp_path, capsys):
    out = tmp_path / "self"
    code, stdout, err = run_cli(capsys, "prune", STORIES, "--nsamples", "8", "--seqlen", "64", "--seed", "5",
                                "--sparsity", "0.3", "-o", out)
    assert code == 0, err
    cal = json.loads((out / "config.json").read_text())["fasp"]["calibration"]
    assert cal == {"self_generated": True, "temperature": 1.0, "start_token": 1, "nsamples": 8, "seqlen": 64,
                   "seed": 5, "sampler": "inverse-cdf", "batch": 8}
    code, _, err = run_cli(capsys, "prune", STORIES, "--sparsity", "0.3", "--calib-temperature", "0",
                           "-o", tmp_path / "o")
    assert_one_line_error(code, err, "--calib-temperature must be > 0")


@needs_stories
@pytest.mark.parametrize("sparsity", ["-0.1", "1.0", "nan"])
def test_bad_sparsity(tmp_path, capsys, sparsity):
    code, _, err = run_cli(capsys, *PRUNE, "--sparsity", sparsity, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "--sparsity must be in [0, 1)")
    assert_nothing_written(tmp_path, "o")


@needs_stories
@pytest.mark.parametrize("align", ["3", "0", "-8"])
def test_bad_align(tmp_path, capsys, align):
    code, _, err = run_cli(capsys, *PRUNE, "--sparsity", "0.2", "--align", align, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "--align must be a positive power of two")
    assert_nothing_written(tmp_path, "o")


@needs_stories
def test_bad_method(tmp_path, capsys):
    code, _, err = run_cli(capsys, *PRUNE, "--sparsity", "0.2", "--method", "sparsegpt", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "unknown --method 'sparsegpt'", "magnitude, wanda-sp, fasp")


@pytest.mark.slow
@needs_stories
def test_existing_output_folder(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = run_cli(capsys, *PRUNE, "--sparsity", "0.2", "-o", out)
    assert_one_line_error(code, err, "not empty", "--overwrite")
    assert (out / "mine.txt").read_text() == "keep me"
    code, _, err = run_cli(capsys, *PRUNE, "--sparsity", "0.2", "-o", out, "--overwrite")
    assert code == 0 and not (out / "mine.txt").exists()


@needs_stories
def test_missing_files(tmp_path, capsys):
    code, _, err = run_cli(capsys, "prune", STORIES, "--calib-file", tmp_path / "nope.txt", "--sparsity", "0.2",
                           "-o", tmp_path / "o")
    assert_one_line_error(code, err, "nope.txt", "does not exist")
    code, _, err = run_cli(capsys, "prune", tmp_path / "no-model", "--calib-file", TINYSTORIES, "--sparsity",
                           "0.2", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, "eval", STORIES, "--text-file", tmp_path / "nope.txt")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, "prune", "--gguf-file", tmp_path / "x.gguf", "--calib-file", TINYSTORIES,
                           "--sparsity", "0.2", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "x.gguf", "does not exist")
    assert_nothing_written(tmp_path, "o")


@needs_stories
def test_calibration_text_too_short(tmp_path, capsys):
    code, _, err = run_cli(capsys, "prune", STORIES, "--calib-file", TINYSTORIES, "--nsamples", "5000",
                           "--sparsity", "0.2", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "gives only", "windows of 512 tokens")
    assert_nothing_written(tmp_path, "o")


def _save_tiny_llama(folder: Path, tamper=None) -> Path:
    cfg = LlamaConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    if tamper is not None:
        tamper(model)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((STORIES / f).read_bytes())
    return folder


@needs_stories
def test_nan_weights(tmp_path, capsys):
    def poison(model):
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")

    src = _save_tiny_llama(tmp_path / "nan-model", poison)
    code, _, err = run_cli(capsys, *PRUNE[:1], src, *PRUNE[2:], "--sparsity", "0.2", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "up_proj.weight", "NaN or Inf")
    assert_nothing_written(tmp_path, "o")


@needs_stories
def test_remote_code_is_refused(tmp_path, capsys):
    src = _save_tiny_llama(tmp_path / "remote")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, *PRUNE[:1], src, *PRUNE[2:], "--sparsity", "0.2", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "--trust-remote-code")
    assert_nothing_written(tmp_path, "o")


class _NotATensor:
    """Pickled alongside the weights: a weights_only load must refuse it."""


@needs_stories
def test_unsafe_pickle_is_refused(tmp_path, capsys):
    src = _save_tiny_llama(tmp_path / "pickled")
    from safetensors.torch import load_file

    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    state["evil"] = _NotATensor()
    torch.save(state, src / "pytorch_model.bin")
    code, _, err = run_cli(capsys, *PRUNE[:1], src, *PRUNE[2:], "--sparsity", "0.2", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "unsafe pickle")
    assert_nothing_written(tmp_path, "o")


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run_cli(capsys, "prune", tmp_path / "gpt2", "--method", "magnitude", "--sparsity", "0.2",
                           "-o", tmp_path / "o")
    assert_one_line_error(code, err, "'gpt2' is not supported", "opt, llama, mistral, qwen2")


@pytest.mark.slow
@needs_stories
def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fasp_edge.cli", "prune", str(STORIES), "--sparsity", "1.5",
                           "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fasp-edge: error: --sparsity")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@needs_stories
def test_ctrl_c_leaves_no_partial_output(tmp_path):
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, num_hidden_layers=24, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=768)
    torch.manual_seed(0)
    src = tmp_path / "slow-model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((STORIES / f).read_bytes())
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fasp_edge.cli", "prune", str(src), "--calib-file",
                             str(TINYSTORIES), "--nsamples", "48", "--seqlen", "256", "--sparsity", "0.3", "-o",
                             str(out)], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_sigint)
    seen = ""
    deadline = time.time() + 240
    while "fasp layers" not in seen and time.time() < deadline:  # wait until pruning is under way
        ch = proc.stderr.read(1)
        if not ch:
            break
        seen += ch
    assert "fasp layers" in seen, seen
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, seen + rest
    assert "interrupted" in rest
    assert_nothing_written(tmp_path, "o")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    from fasp_edge import prune

    from .conftest import MODEL_BUILDERS

    with pytest.raises(Exception, match="no CUDA device is available"):
        prune(MODEL_BUILDERS["opt"](), sparsity=0.2, method="magnitude", device="cuda", progress=False)


# ---------------------------------------------------------------- export and generate
@pytest.fixture(scope="module")
def stories_onnx_bundle(tmp_path_factory):
    if not STORIES.exists():
        pytest.skip("shared stories260K data absent")
    out = tmp_path_factory.mktemp("cli") / "bundle"
    assert main(["--quiet", "export", str(STORIES), "--formats", "onnx", "--max-context", "128", "-o", str(out)]) == 0
    return out


@pytest.mark.slow
def test_export_and_generate(stories_onnx_bundle, capsys, tmp_path):
    capsys.readouterr()
    code, out, err = run_cli(capsys, "generate", stories_onnx_bundle, "--backend", "onnx", "--prompt",
                             "Once upon a time", "--max-new-tokens", "16")
    assert code == 0, err
    assert out.startswith(", there was a little girl named Lily.")
    assert "tokens/s" in err and "time to first token" in err
    code, out, err = run_cli(capsys, "generate", STORIES, "--backend", "torch", "--prompt", "Once upon a time",
                             "--max-new-tokens", "16")
    assert code == 0 and out.startswith(", there was a little girl named Lily."), err


@pytest.mark.slow
def test_generate_bad_input(stories_onnx_bundle, capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", stories_onnx_bundle, "--backend", "onnx", "--prompt", "Once upon",
                           "--max-new-tokens", "200")
    assert_one_line_error(code, err, "exceeds the exported context of 128", "--max-context")
    code, _, err = run_cli(capsys, "generate", stories_onnx_bundle, "--backend", "pte", "--prompt", "x")
    assert_one_line_error(code, err, "has no pte artifact", "--formats pte")
    code, _, err = run_cli(capsys, "generate", stories_onnx_bundle, "--backend", "tpu", "--prompt", "x")
    assert_one_line_error(code, err, "unknown backend 'tpu'")
    broken = tmp_path / "broken"
    shutil.copytree(stories_onnx_bundle, broken)
    (broken / "model.onnx.data").write_bytes(b"\0" * (broken / "model.onnx.data").stat().st_size)
    code, _, err = run_cli(capsys, "generate", broken, "--backend", "onnx", "--prompt", "x")
    assert_one_line_error(code, err, "model.onnx.data", "sha256")
    notok = tmp_path / "notok"
    shutil.copytree(stories_onnx_bundle, notok)
    (notok / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "generate", notok, "--backend", "onnx", "--prompt", "x")
    assert_one_line_error(code, err, "tokenizer.json is missing")


@needs_stories
@pytest.mark.parametrize("argv, needles", [
    (["--formats", "pte,tflite"], ["unknown format tflite", "pte, onnx"]),
    (["--formats", "onnx", "--quant", "8da4w"], ["8da4w applies to pte only", "not onnx"]),
    (["--formats", "pte", "--quant", "int4"], ["unknown --quant 'int4'"]),
    (["--max-context", "64"], ["below the 97 positions"]),
    (["--max-context", "4096"], ["exceeds the model's 512 positions"]),
])
def test_export_bad_input(tmp_path, capsys, argv, needles):
    code, _, err = run_cli(capsys, "export", STORIES, *argv, "-o", tmp_path / "b")
    assert_one_line_error(code, err, *needles)
    assert_nothing_written(tmp_path, "b")


@needs_stories
def test_export_refuses_existing_output(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    code, _, err = run_cli(capsys, "export", STORIES, "-o", tmp_path / "b")
    assert_one_line_error(code, err, "--overwrite")


def test_prune_with_a_resume_folder_removes_it_once_the_checkpoint_is_written(tmp_path, capsys):
    out, progress = tmp_path / "s30", tmp_path / "progress"
    code, stdout, err = run_cli(capsys, *PRUNE, "--sparsity", "0.3", "--align", "2", "--resume-dir", progress, "-o", out)
    assert code == 0, err
    assert (out / "config.json").is_file() and not progress.exists()
    report = json.loads((out / "fasp_report.json").read_text())
    assert "resumed_layers" not in report  # nothing was there to continue
    progress.mkdir()
    (progress / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, *PRUNE, "--sparsity", "0.3", "--resume-dir", progress, "-o", tmp_path / "other")
    assert code == 2 and "holds no prune progress" in err and err.count("\n") == 1
    assert (progress / "notes.txt").read_text() == "mine" and not (tmp_path / "other").exists()
