"""Text for the larger (coder) models: English from WikiText-2 and code from the Python standard library.

Qwen2.5-Coder models are measured on code as well as on English. The code is the Python standard library's
own top-level modules on this machine (``sysconfig``'s ``stdlib`` folder, ``*.py`` directly in it, no
subfolders, no tests), split by file name so that calibration and evaluation never share a file:

- ``code-calib``: modules whose name (leading underscores dropped) starts with a-m, in name order, cut at a
  file boundary once it reaches as many characters as WikiText-2 validation;
- ``code-test``: modules starting with n-z, in name order.

``calib-mixed`` is WikiText-2 validation followed by ``code-calib``: windows drawn from it at random are about
half English, half code. Evaluation uses WikiText-2 test and ``code-test``; nothing is chosen on them.

    .venv/bin/python benchmarks/corpora.py out/corpora      # writes the three files, prints their sha256
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

from fasp_edge.fsutil import atomic_file

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASP_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))
WIKI_VALID = DATA / "wikitext2" / "wiki.valid.tokens"
WIKI_TEST = DATA / "wikitext2" / "wiki.test.joined.txt"


def stdlib_modules() -> list[Path]:
    folder = Path(sysconfig.get_paths()["stdlib"])
    return sorted((p for p in folder.glob("*.py") if p.is_file()), key=lambda p: p.name.lstrip("_").lower())


def _first_letter(p: Path) -> str:
    return p.name.lstrip("_")[:1].lower()


def _join(files: list[Path], limit: int | None = None) -> tuple[str, list[str]]:
    """The files' texts, blank-line separated, stopping after the file that reaches ``limit`` characters;
    and the names of the files used."""
    parts, names, total = [], [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        names.append(f.name)
        total += len(text)
        if limit is not None and total >= limit:
            break
    return "\n\n".join(parts), names


def build(folder: str | os.PathLike) -> dict[str, dict]:
    """Write code-calib.txt, code-test.txt and calib-mixed.txt into ``folder`` (reused when there); returns
    each file's path, characters, sha256 and the modules it holds."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    wiki = WIKI_VALID.read_text(encoding="utf-8")
    mods = stdlib_modules()
    calib_files = [p for p in mods if "a" <= _first_letter(p) <= "m"]
    test_files = [p for p in mods if "n" <= _first_letter(p) <= "z"]
    code_calib, calib_used = _join(calib_files, limit=len(wiki))
    code_test, test_used = _join(test_files)
    texts = {"code-calib": code_calib, "code-test": code_test, "calib-mixed": wiki + "\n\n" + code_calib}
    info = {}
    for name, text in texts.items():
        path = out / f"{name}.txt"
        data = text.encode("utf-8")
        if not path.is_file() or path.read_bytes() != data:
            with atomic_file(path) as tmp:
                tmp.write_bytes(data)
        info[name] = {"path": str(path), "chars": len(text), "sha256": hashlib.sha256(data).hexdigest()}
    info["code-calib"]["modules"] = calib_used
    info["code-test"]["modules"] = test_used
    info["python"] = sys.version.split()[0]
    return info


if __name__ == "__main__":
    import json

    res = build(sys.argv[1] if len(sys.argv) > 1 else REPO / "out" / "corpora")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "modules"} if isinstance(v, dict) else v
                      for k, v in res.items()}, indent=1))
