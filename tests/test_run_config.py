"""The run configuration: the documented default, user files, --set overrides and the errors they give."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fasp_edge.cli import main
from fasp_edge.job.config import SCHEMA, ConfigError, default_text, defaults, load_config

from .conftest import STORIES


def _write(tmp_path: Path, text: str, name: str = "my.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_default_sets_and_documents_every_key():
    data = defaults()
    for section, keys in SCHEMA.items():
        table = data if not section else data[section]
        assert set(k for k, v in table.items() if not isinstance(v, dict)) == set(keys), section
    # every key line carries a comment saying what it does
    for line in default_text().splitlines():
        if re.match(r"^[a-z_]+\s*=", line):
            assert "#" in line, f"undocumented key: {line}"
    cfg = load_config()  # the default passes its own checks
    assert cfg.data == {**data, "output_dir": str(Path.cwd() / "runs")} and cfg.source == "the embedded default"
    assert cfg["prune"]["sparsities"] == [0.2]
    assert cfg["export"]["artifacts"] == ["pte-8da4w"]
    assert cfg["export"]["dense_artifacts"] == ["pte-8da4w"]  # a like-for-like reference per artifact
    assert cfg["bench"]["profiles"] == ["hub", "phone-mid"]


def test_user_file_overrides_and_keeps_the_rest(tmp_path):
    (tmp_path / "calib.txt").write_text("hello")
    f = _write(tmp_path, 'name = "mine"\n[prune]\nsparsities = [0.1, 0.3]\n[calibration]\ntext_file = "calib.txt"\n')
    cfg = load_config(f)
    assert cfg.name == "mine" and cfg["prune"]["sparsities"] == [0.1, 0.3]
    assert cfg["prune"]["method"] == "fasp"  # untouched keys keep the default
    assert Path(cfg["calibration"]["text_file"]) == (tmp_path / "calib.txt").resolve()  # read from the file's folder
    again = load_config(_write(tmp_path / "..", cfg.to_toml(), "copy.toml"))  # the written config means the same
    assert again.data == cfg.data


def test_set_paths_are_read_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.txt").write_text("x")
    f = _write(tmp_path / "cfgdir", "[calibration]\nseed = 3\n", "c.toml")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(f, ["calibration.text_file=data/val.txt"])
    assert Path(cfg["calibration"]["text_file"]) == tmp_path / "data" / "val.txt"
    assert Path(cfg["output_dir"]) == tmp_path / "runs"  # absolute: config.toml reruns from anywhere


def test_checks_across_keys_name_the_key_and_where_it_was_set(tmp_path):
    with pytest.raises(ConfigError, match=r"my\.toml: calibration\.text_file .*nope\.txt does not exist"):
        load_config(_write(tmp_path, '[calibration]\ntext_file = "nope.txt"\n'))
    with pytest.raises(ConfigError, match=r"--set prune\.sparsities=\[0\.2, 0\.2000000001\]: .* same name"):
        load_config(None, ["prune.sparsities=[0.2, 0.2000000001]"])
    with pytest.raises(ConfigError, match=r"my\.toml: bench\.profiles: unknown profile 'watch'.*bench\.profile_files"):
        load_config(_write(tmp_path, '[bench]\nprofiles = ["watch"]\n'))
    with pytest.raises(ConfigError, match=r"--set evaluate\.agreement_seed=0: evaluate\.agreement_seed equals"):
        load_config(None, ["evaluate.agreement_seed=0"])
    # with calibration text there is no self-generated text to keep apart from
    (tmp_path / "cal.txt").write_text("x")
    load_config(_write(tmp_path, '[calibration]\ntext_file = "cal.txt"\n[evaluate]\nagreement_seed = 0\n'))


def test_set_overrides_take_toml_values(tmp_path):
    cfg = load_config(None, ["prune.sparsities=[0.2, 0.3]", "bench.reps=5", "name=other", "prune.method=wanda-sp"])
    assert cfg["prune"]["sparsities"] == [0.2, 0.3] and cfg["bench"]["reps"] == 5 and cfg.name == "other"
    assert cfg["prune"]["method"] == "wanda-sp"
    assert load_config(None, ["prune.damp=1"])["prune"]["damp"] == 1.0  # an integer where a number is wanted


@pytest.mark.parametrize("text, message", [
    ("[prune]\nsparsity = 0.2\n", r"my\.toml: unknown key 'prune\.sparsity' \(did you mean 'prune\.sparsities'\?\)"),
    ("colour = 1\n", r"my\.toml: unknown key 'colour'"),
    ("[prune]\nsparsities = 0.2\n", r"my\.toml: prune\.sparsities must be a list of numbers, got a number"),
    ("[bench]\nreps = \"five\"\n", r"my\.toml: bench\.reps must be a whole number, got a string"),
    ("[bench]\nreps = 0\n", r"my\.toml: bench\.reps must be >= 1"),
    ("[export]\nartifacts = [\"pte-4bit\"]\n", r"my\.toml: export\.artifacts has 'pte-4bit'; choose from 'pte'"),
    ("[prune]\nsparsities = [1.5]\n", r"my\.toml: prune\.sparsities must hold fractions strictly between 0 and 1"),
    ("prune = 3\n", r"my\.toml: \[prune\] must be a table"),
    ("[model]\ntrust_remote_code = \"yes\"\n", r"my\.toml: model\.trust_remote_code must be true or false"),
    ("name = \"a/b\"\n", r"my\.toml: name must be a non-empty word"),
    ("[evaluate]\nagreement_seed = 0\n", r"my\.toml: evaluate\.agreement_seed equals calibration\.seed"),
    ("[prune\n", r"my\.toml: not valid TOML"),
    ("[evaluate]\ntasks = [\"mmlu\"]\n", r"my\.toml: evaluate\.tasks has 'mmlu'; choose from 'piqa', 'arc_easy'"),
    ("[evaluate]\ntask_limit = -1\n", r"my\.toml: evaluate\.task_limit must be >= 0"),
])
def test_bad_config_names_the_key_and_the_file(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_bad_override_names_the_flag():
    with pytest.raises(ConfigError, match=r"--set bench\.reps=x: bench\.reps must be a whole number, got a string"):
        load_config(None, ["bench.reps=x"])
    with pytest.raises(ConfigError, match=r"--set bnch\.reps=1: unknown section 'bnch'"):
        load_config(None, ["bnch.reps=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["bench.reps"])


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    f = _write(tmp_path, "[prune]\nsparsity = 0.2\n")
    assert main(["run", str(f), "-o", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fasp-edge: error: ") and "prune.sparsity" in err and str(f) in err
    assert "\n" not in err and not (tmp_path / "runs").exists()
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--force", "everything", "-o", str(tmp_path / "runs")]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_print_config(tmp_path, capsys):
    assert main(["run", "--print-config"]) == 0
    assert capsys.readouterr().out == default_text()
    assert main(["run", "--print-config", "--set", "prune.sparsities=[0.3]", "--name", "x"]) == 0
    out = tomllib.loads(capsys.readouterr().out)
    assert out["prune"]["sparsities"] == [0.3] and out["name"] == "x"


def test_shipped_examples_are_valid():
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
    assert examples
    for f in examples:
        cfg = load_config(f)
        assert cfg.source == str(f)


def test_param_reductions_name_budget_models_and_one_model_is_needed():
    cfg = load_config(None, ["prune.param_reductions=[0.16]"])
    assert cfg["prune"]["param_reductions"] == [0.16] and cfg["prune"]["allocation"] == "error"
    with pytest.raises(ConfigError, match="name at least one model to prune"):
        load_config(None, ["prune.sparsities=[]"])
    with pytest.raises(ConfigError, match=r"prune\.param_reductions must hold fractions strictly between 0 and 1"):
        load_config(None, ["prune.param_reductions=[1.2]"])
    with pytest.raises(ConfigError, match="same name"):
        load_config(None, ["prune.param_reductions=[0.2, 0.2000000001]"])


def test_refit_settings_reach_the_config_and_are_checked_together():
    defaults = load_config(None, [])["prune"]  # the measured-best refit is the default; the earlier one is reachable
    assert (defaults["damp"], defaults["refit_prior"], defaults["selection"]) == ("auto", "original", "auto")
    old = load_config(None, ["prune.damp=0.01", "prune.refit_prior=\"zero\"", "prune.selection=\"score\""])["prune"]
    assert (old["damp"], old["refit_prior"], old["selection"]) == (0.01, "zero", "score")
    assert load_config(None, ["prune.method=\"wanda-sp\""])["prune"]["selection"] == "auto"  # auto: score there
    cfg = load_config(None, ["prune.damp=\"auto\"", "prune.refit_prior=\"original\"", "prune.selection=\"obs\""])
    assert (cfg["prune"]["damp"], cfg["prune"]["refit_prior"], cfg["prune"]["selection"]) == \
        ("auto", "original", "obs")
    with pytest.raises(ConfigError, match=r"prune\.damp must be a number or \"auto\", got a string"):
        load_config(None, ["prune.damp=\"often\""])
    with pytest.raises(ConfigError, match=r"prune\.refit_prior must be one of 'zero', 'original'"):
        load_config(None, ["prune.refit_prior=\"mean\""])
    with pytest.raises(ConfigError, match=r"prune\.selection \"obs\" .* needs prune\.method \"fasp\""):
        load_config(None, ["prune.selection=\"obs\"", "prune.method=\"wanda-sp\""])
    with pytest.raises(ConfigError, match=r"prune\.damp \"auto\" holds every 4th .* calibration\.nsamples"):
        load_config(None, ["prune.damp=\"auto\"", "calibration.nsamples=3"])
    with pytest.raises(ConfigError, match=r"prune\.damp \"auto\" holds every 4th"):  # the default damp too
        load_config(None, ["calibration.nsamples=3"])


@pytest.mark.slow
def test_tasks_are_off_by_default_and_a_too_long_request_stops_the_run_before_any_export():
    from fasp_edge.job.run import RunError, _check_tasks

    assert load_config(None, [])["evaluate"]["tasks"] == []
    pytest.importorskip("lm_eval", reason="the eval extra is not installed")
    if not STORIES.exists():
        pytest.skip("shared stories260K data absent")
    from fasp_edge.checkpoints.loading import load_tokenizer

    tok = load_tokenizer(str(STORIES))
    cfg = load_config(None, ['evaluate.tasks=["winogrande", "boolq"]', "evaluate.task_limit=3", "export.max_context=128"])
    with pytest.raises(RunError, match=r"task boolq's longest request is \d+ tokens, more than export\.max_context = "
                                       r"128; raise export\.max_context to \d+ or leave boolq out of evaluate\.tasks"):
        _check_tasks(cfg, tok)
    _check_tasks(load_config(None, ['evaluate.tasks=["boolq"]', "export.artifacts=[]", "export.dense_artifacts=[]"]),
                 tok)  # no artifact: nothing to fit
