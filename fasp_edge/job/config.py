"""The configuration of ``fasp-edge run``: a TOML file, checked key by key.

The embedded default, ``run.toml`` next to this module, is also the documentation: it sets every key,
with a comment saying what it does. A user's file may set any subset; what it leaves out takes the
default. ``--set section.key=VALUE`` overrides one key (VALUE is TOML: ``0.3``, ``[0.2, 0.3]``,
``"text"``; a bare word is taken as a string). Every error names the key and the file (or the flag).
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..artifacts import BACKENDS, BY_KEY
from ..errors import InvalidArgument
from ..pipeline.allocation import RULES as ALLOCATION_RULES
from ..pipeline.channels import HOLDOUT_EVERY
from ..pipeline.fasp import REFIT_PRIORS, SELECTIONS
from ..pipeline.options import TARGETS
from ..pipeline.tasks import TASKS
from ..runtime_bench.profiles import resolve_profiles

DEFAULT_NAME = "run.toml"
STAGES = ("calibrate", "prune", "evaluate", "export", "bench", "report")


class ConfigError(InvalidArgument):
    """A run configuration is unreadable or has a bad key or value."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


# key -> (type description, check(value) -> problem or None); the values come from run.toml
def _choice(options) -> Any:
    return lambda v: None if v in options else f"must be one of {', '.join(map(repr, options))}"


def _list_of(options) -> Any:
    def check(v):
        bad = [x for x in v if x not in options]
        if bad:
            return f"has {bad[0]!r}; choose from {', '.join(map(repr, options))}"
        if len(set(v)) != len(v):
            return "names an entry twice"
        return None
    return check


def _at_least(n):
    return lambda v: None if v >= n else f"must be >= {n}"


def _name(v):
    return None if re.fullmatch(r"[A-Za-z0-9._-]+", v) and v not in (".", "..") else \
        "must be a non-empty word of letters, digits, '.', '_' or '-'"


def _fractions(what: str):
    def check(v):
        if any(not 0 < s < 1 for s in v):
            return "must hold fractions strictly between 0 and 1"
        return f"names a {what} twice" if len(set(v)) != len(v) else None
    return check


def _power_of_two(v):
    return None if v >= 1 and v & (v - 1) == 0 else "must be a power of two (1, 2, 4, ... 32)"


def _non_empty(v):
    return None if v else "must not be empty"


SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "": {"name": ("str", _name), "output_dir": ("str", _non_empty)},
    "model": {"source": ("str", None), "gguf_file": ("str", None), "trust_remote_code": ("bool", None)},
    "prune": {"method": ("str", _choice(("fasp", "wanda-sp", "magnitude"))),
              "sparsities": ("list[number]", _fractions("sparsity")),
              "param_reductions": ("list[number]", _fractions("parameter reduction")),
              "allocation": ("str", _choice(ALLOCATION_RULES)),
              "targets": ("list[str]", lambda v: _non_empty(v) or _list_of(TARGETS)(v)),
              "align": ("int", _power_of_two),
              "damp": ("damp", lambda v: None if v == "auto" or v >= 0 else "must be >= 0 or \"auto\""),
              "refit_prior": ("str", _choice(REFIT_PRIORS)), "selection": ("str", _choice(SELECTIONS)),
              "device": ("str", _choice(("cpu", "cuda")))},
    "calibration": {"text_file": ("str", None), "nsamples": ("int", _at_least(1)), "seqlen": ("int", _at_least(2)),
                    "seed": ("int", None), "temperature": ("number", lambda v: None if v > 0 else "must be > 0")},
    "evaluate": {"text_file": ("str", None), "seqlen": ("int", _at_least(2)), "max_windows": ("int", _at_least(0)),
                 "agreement_samples": ("int", _at_least(0)), "agreement_seqlen": ("int", _at_least(2)),
                 "agreement_seed": ("int", None), "tasks": ("list[str]", _list_of(tuple(TASKS))),
                 "task_limit": ("int", _at_least(0))},
    "export": {"artifacts": ("list[str]", _list_of(tuple(BY_KEY))),
               "dense_artifacts": ("list[str]", _list_of(tuple(BY_KEY))),
               "max_context": ("int", _at_least(2)), "jobs": ("int", _at_least(1))},
    "bench": {"profiles": ("list[str]", None), "profile_files": ("list[str]", None),
              "backends": ("list[str]", _list_of(BACKENDS)), "reps": ("int", _at_least(1)),
              "warmup": ("int", _at_least(0)), "rounds": ("int", _at_least(1))},
}


def _type_ok(kind: str, v: Any) -> bool:
    if kind == "str":
        return isinstance(v, str)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return _is_int(v)
    if kind == "number":
        return _is_num(v)
    if kind == "damp":
        return _is_num(v) or v == "auto"
    if kind == "list[str]":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if kind == "list[number]":
        return isinstance(v, list) and all(_is_num(x) for x in v)
    raise AssertionError(kind)


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "a whole number", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _key(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def default_text() -> str:
    return (resources.files(__package__) / DEFAULT_NAME).read_text()


def defaults() -> dict:
    return tomllib.loads(default_text())


@dataclass
class RunConfig:
    """A checked configuration: ``data`` has every key; ``base`` is the folder relative file paths start from."""

    data: dict
    source: str  # the file (or "the embedded default")
    base: Path

    def __getitem__(self, section: str) -> dict:
        return self.data[section]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def folder(self) -> Path:
        return Path(self.data["output_dir"]) / self.data["name"]

    def path(self, value: str) -> Path | None:
        """A file path from the config (already resolved by :func:`load_config`); None when empty."""
        return Path(value) if value else None

    def to_toml(self) -> str:
        """The configuration as TOML (every key), as it was run."""
        lines = [f"# fasp-edge run configuration (from {self.source})"]
        for section, keys in SCHEMA.items():
            if section:
                lines += ["", f"[{section}]"]
            for key in keys:
                lines.append(f"{key} = {_toml_value(self.data[section][key] if section else self.data[key])}")
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _merge(base: dict, user: dict, where: str) -> None:
    """Check ``user``'s keys and types against the schema and copy them into ``base``."""
    for key, value in user.items():
        if key in SCHEMA and key:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table (a [{key}] section), got {_type_name(value)}")
            for sub, v in value.items():
                _set(base, key, sub, v, where)
        else:
            _set(base, "", key, value, where)


def _set(base: dict, section: str, key: str, value: Any, where: str) -> None:
    keys = SCHEMA[section]
    if key not in keys:
        known = list(keys) if section else list(keys) + [f"[{s}]" for s in SCHEMA if s]
        hint = difflib.get_close_matches(key, list(keys), n=1)
        did = f" (did you mean {_key(section, hint[0])!r}?)" if hint else ""
        raise ConfigError(f"{where}: unknown key {_key(section, key)!r}{did}; "
                          f"{'[' + section + ']' if section else 'the top level'} takes {', '.join(known)}")
    kind, check = keys[key]
    if kind in ("number", "damp") and _is_int(value):
        value = float(value)
    if kind == "list[number]" and isinstance(value, list):
        value = [float(x) if _is_int(x) else x for x in value]
    if not _type_ok(kind, value):
        raise ConfigError(f"{where}: {_key(section, key)} must be {_describe(kind)}, got {_type_name(value)} "
                          f"{_toml_value(value) if not isinstance(value, dict) else ''}".rstrip())
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{where}: {_key(section, key)} {problem} (got {_toml_value(value)})")
    if section:
        base[section][key] = value
    else:
        base[key] = value


def _describe(kind: str) -> str:
    return {"str": "a string", "bool": "true or false", "int": "a whole number", "number": "a number",
            "damp": 'a number or "auto"', "list[str]": "a list of strings", "list[number]": "a list of numbers"}[kind]


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=VALUE`` -> (section, key, value); VALUE is TOML, or a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set prune.sparsities=[0.2,0.3]")
    dotted, raw = (s.strip() for s in text.split("=", 1))
    section, _, key = dotted.rpartition(".")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The embedded default, updated by the file at ``path`` (if given), then by ``--set`` overrides.

    Relative paths in the file are read from the file's folder, those given with ``--set`` (and
    ``output_dir``) from the working directory; the result holds absolute paths.
    """
    data = defaults()
    if path is None:
        source, base = "the embedded default", Path.cwd()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (`fasp-edge run --print-config > {p.name}` writes "
                              "the default to start from)")
        try:
            user = tomllib.loads(p.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read it ({e})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
        _merge(data, user, str(p))
        source, base = str(p), p.resolve().parent
    _resolve_paths(data, base)
    where = {}  # key -> where its value came from, for the checks below
    for text in overrides:
        section, key, value = parse_override(text)
        if section and section not in SCHEMA:
            raise ConfigError(f"--set {text}: unknown section {section!r}; sections: "
                              f"{', '.join(s for s in SCHEMA if s)}")
        _set(data, section, key, value, f"--set {text}")
        where[_key(section, key)] = f"--set {text}"
    _resolve_paths(data, Path.cwd())  # only what --set made relative is still relative
    data["output_dir"] = str(Path(data["output_dir"]).expanduser().resolve())
    _check(data, lambda *keys: next((where[k] for k in keys if k in where), source))
    return RunConfig(copy.deepcopy(data), source, base)


def model_label(method: str, sparsity: float | None, param_reduction: float | None = None) -> str:
    """The name of a pruned model in a run (its folders, its bundles' names): ``fasp-0.2`` for a sparsity,
    ``fasp-p0.16`` for a fraction of all parameters."""
    return f"{method}-{sparsity:g}" if param_reduction is None else f"{method}-p{param_reduction:g}"


def _check(data: dict, origin) -> None:
    """Checks across keys and against the file system; ``origin(*keys)`` names where a key was set."""
    cal, ev, pr = data["calibration"], data["evaluate"], data["prune"]
    self_generated = not cal["text_file"] and pr["method"] != "magnitude"
    if self_generated and ev["agreement_samples"] and ev["agreement_seed"] == cal["seed"]:
        raise ConfigError(f"{origin('evaluate.agreement_seed', 'calibration.seed')}: evaluate.agreement_seed equals "
                          f"calibration.seed ({cal['seed']}); the agreement text must be held out from the "
                          "self-generated calibration text: change one of them")
    if pr["selection"] == "obs" and pr["method"] != "fasp":
        raise ConfigError(f"{origin('prune.selection', 'prune.method')}: prune.selection \"obs\" chooses channels by "
                          f"the error left after FASP's refit; it needs prune.method \"fasp\", not {pr['method']!r}")
    if pr["damp"] == "auto" and pr["method"] == "fasp" and cal["nsamples"] < HOLDOUT_EVERY:
        raise ConfigError(f"{origin('prune.damp', 'calibration.nsamples')}: prune.damp \"auto\" holds every "
                          f"{HOLDOUT_EVERY}th calibration window out to choose λ: set calibration.nsamples to at "
                          f"least {HOLDOUT_EVERY} (it is "
                          f"{cal['nsamples']}) or give prune.damp a number")
    if not pr["sparsities"] and not pr["param_reductions"]:
        raise ConfigError(f"{origin('prune.sparsities', 'prune.param_reductions')}: name at least one model to prune: "
                          "a value in prune.sparsities or in prune.param_reductions")
    labels = [model_label(pr["method"], s) for s in pr["sparsities"]]
    budgets = [model_label(pr["method"], None, r) for r in pr["param_reductions"]]
    for key, names in (("sparsities", labels), ("param_reductions", budgets)):
        if len(set(names)) != len(names):
            raise ConfigError(f"{origin('prune.' + key)}: prune.{key} {pr[key]} give two models the same "
                              f"name ({', '.join(names)}); use values that differ in their first 6 digits")
    for section in ("calibration", "evaluate"):
        f = data[section]["text_file"]
        if f and not Path(f).is_file():
            raise ConfigError(f"{origin(section + '.text_file')}: {section}.text_file {f} does not exist")
    for f in data["bench"]["profile_files"]:
        if not Path(f).is_file():
            raise ConfigError(f"{origin('bench.profile_files')}: bench.profile_files: {f} does not exist")
    if data["export"]["artifacts"] or data["export"]["dense_artifacts"]:

        try:
            resolve_profiles(data["bench"]["profiles"], data["bench"]["profile_files"])
        except InvalidArgument as e:
            msg = str(e).replace("(add your own with --profile-file)", "(add your own with bench.profile_files)")
            raise ConfigError(f"{origin('bench.profiles', 'bench.profile_files')}: bench.profiles: {msg}") from None


def _resolve_paths(data: dict, base: Path) -> None:
    """Make the config's file paths absolute, read from ``base`` (the config file's folder), so that the
    ``config.toml`` a run writes means the same wherever it is read from. ``model.source`` is a path only
    where such a folder exists; otherwise it is a hub id and stays as written."""
    def absolute(v: str) -> str:
        p = Path(v).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    for section, key in (("calibration", "text_file"), ("evaluate", "text_file")):
        if data[section][key]:
            data[section][key] = absolute(data[section][key])
    data["bench"]["profile_files"] = [absolute(f) for f in data["bench"]["profile_files"]]
    m = data["model"]
    if m["source"] and Path(absolute(m["source"])).exists():
        m["source"] = absolute(m["source"])
    if m["gguf_file"] and not m["source"]:
        m["gguf_file"] = absolute(m["gguf_file"])

