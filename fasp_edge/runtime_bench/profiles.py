"""Device profiles: what a class of device gives a model (threads, CPUs, memory) and what it asks of it.

Profiles are TOML files. The shipped ones live in ``fasp_edge/runtime_bench/profiles/``; a user adds
their own with ``--profile-file``. Keys (all required except ``cpu_affinity`` and ``note``):

``name`` (str), ``description`` (str, one line), ``threads`` (int >= 1), ``cpu_affinity`` (``"first"``:
the first ``threads`` CPUs this process may use, the default; ``"all"``; or a list of CPU ids),
``memory_budget_mb`` (int >= 1), ``context_length``, ``prompt_tokens``, ``generate_tokens`` (ints >= 1),
``note`` (str: the real device class and where its figures come from).
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from ..errors import InvalidArgument


class ProfileError(InvalidArgument):
    """A profile file is missing, unreadable or has a bad key."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    threads: int
    memory_budget_mb: int
    context_length: int
    prompt_tokens: int
    generate_tokens: int
    cpu_affinity: str | tuple[int, ...] = "first"
    note: str = ""
    source: str = ""  # the file it came from

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cpu_affinity"] = list(self.cpu_affinity) if isinstance(self.cpu_affinity, tuple) else self.cpu_affinity
        return d


_INT_KEYS = ("threads", "memory_budget_mb", "context_length", "prompt_tokens", "generate_tokens")
_STR_KEYS = ("name", "description", "note")
_REQUIRED = ("name", "description", *_INT_KEYS)


def parse_profile(data: dict, source: str) -> Profile:
    """Validate a profile's keys and types; errors name the key and the file."""
    unknown = sorted(set(data) - set(_INT_KEYS) - set(_STR_KEYS) - {"cpu_affinity"})
    if unknown:
        raise ProfileError(f"{source}: unknown key {unknown[0]!r}; allowed keys: "
                           f"{', '.join((*_REQUIRED, 'cpu_affinity', 'note'))}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ProfileError(f"{source}: missing key {missing[0]!r}")
    for k in _STR_KEYS:
        if k in data and not isinstance(data[k], str):
            raise ProfileError(f"{source}: {k!r} must be a string, got {type(data[k]).__name__}")
    for k in _INT_KEYS:
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ProfileError(f"{source}: {k!r} must be a whole number >= 1, got {v!r}")
    if data["prompt_tokens"] + data["generate_tokens"] > data["context_length"]:
        raise ProfileError(f"{source}: prompt_tokens + generate_tokens ({data['prompt_tokens']} + "
                           f"{data['generate_tokens']}) exceed context_length {data['context_length']}")
    aff = data.get("cpu_affinity", "first")
    if isinstance(aff, list):
        if not aff or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in aff):
            raise ProfileError(f"{source}: 'cpu_affinity' must be \"first\", \"all\" or a non-empty list of CPU "
                               f"ids >= 0, got {aff!r}")
        aff = tuple(aff)
    elif aff not in ("first", "all"):
        raise ProfileError(f"{source}: 'cpu_affinity' must be \"first\", \"all\" or a list of CPU ids, got {aff!r}")
    if not data["name"].strip() or any(c in data["name"] for c in "/\\ ,"):
        raise ProfileError(f"{source}: 'name' must be a non-empty word without spaces, commas or slashes")
    return Profile(name=data["name"], description=data["description"], threads=data["threads"],
                   memory_budget_mb=data["memory_budget_mb"], context_length=data["context_length"],
                   prompt_tokens=data["prompt_tokens"], generate_tokens=data["generate_tokens"],
                   cpu_affinity=aff, note=data.get("note", "").strip(), source=source)


def load_profile_file(path: str | Path) -> Profile:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: not a readable TOML file ({e})") from None
    return parse_profile(data, str(path))


def builtin_profiles() -> dict[str, Profile]:
    """The shipped profiles, by name."""
    out = {}
    folder = resources.files(__package__) / "profiles"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            prof = parse_profile(tomllib.loads(entry.read_text()), f"{__package__}/profiles/{entry.name}")
            out[prof.name] = prof
    return out


def resolve_profiles(names: list[str], files: list[str] | None = None) -> list[Profile]:
    """Profiles by name, from the shipped ones and ``files`` (a file's profile wins over a shipped one)."""
    known = builtin_profiles()
    mine = [load_profile_file(f) for f in files or []]
    known.update({p.name: p for p in mine})
    if not names:  # only the user's files given: measure those
        names = [p.name for p in mine]
    if not names:
        raise InvalidArgument("no profile given; pass --profiles (see `fasp-edge profiles`) or --profile-file")
    out = []
    for n in names:
        if n not in known:
            raise InvalidArgument(f"unknown profile {n!r}; known: {', '.join(sorted(known))} "
                                  "(add your own with --profile-file)")
        if known[n] not in out:
            out.append(known[n])
    return out
