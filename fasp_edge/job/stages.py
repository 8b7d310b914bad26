"""Cached, resumable stages for long jobs (``fasp-edge run``: prune -> evaluate -> export -> bench -> report).

A stage owns one output folder. It is built in a temporary sibling and renamed into place with a
``stage.json`` that records the stage's fingerprint: a hash of everything its output depends on (its
settings, the fingerprints of the stages it reads, the fasp-edge version). Running a stage again skips
it when the folder is there with the same fingerprint, and rebuilds it otherwise. Because the folder
appears only complete, a run killed at any moment (SIGINT or SIGKILL) leaves either the old complete
folder or none, plus at worst a stale temporary sibling that the next run removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..fsutil import atomic_output_dir

log = logging.getLogger(__name__)

RECORD = "stage.json"


def fingerprint(settings: dict[str, Any], upstream: list[str] | tuple[str, ...] = ()) -> str:
    """A stable hash of a stage's settings (JSON-able) and the fingerprints of the stages it reads."""

    body = json.dumps({"settings": settings, "upstream": list(upstream), "fasp_edge": __version__},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    folder: Path
    fingerprint: str
    skipped: bool  # True: an earlier run's output was reused
    seconds: float
    info: dict


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def remove_stale_temporaries(folder: Path) -> None:
    """Remove what a killed run left next to ``folder`` (the temporary folders of atomic writes)."""
    if folder.parent.is_dir():
        for p in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in folder.parent.glob(f".{folder.name}.old-*"):
            shutil.rmtree(p, ignore_errors=True)


def sweep_temporaries(folder: Path) -> int:
    """Remove what killed runs left in a run folder: temporary stage folders and files (``.NAME.tmp-*``,
    ``.NAME.old-*``), also of stages the current configuration no longer has. Call it holding the lock."""
    n = 0
    for parent in [folder] + [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]:
        for p in parent.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                n += 1
    return n


def run_stage(name: str, folder: str | Path, fp: str, build: Callable[[Path], dict | None], *,
              force: bool = False) -> StageResult:
    """Build ``folder`` with ``build(tmp_folder) -> info`` unless it already holds fingerprint ``fp``.

    ``force`` rebuilds regardless. ``info`` (JSON-able) is kept in the stage record and returned. An ``info``
    with ``"incomplete": reason`` still writes the folder (its output is shown), but the record says it is
    not complete, so the next run builds it again (a measurement that failed once, for instance).
    """
    folder = Path(folder)
    remove_stale_temporaries(folder)
    record = read_record(folder)
    if not force and record is not None and record.get("fingerprint") == fp and record.get("complete"):
        log.debug("%s: up to date (%s), skipped", name, folder)
        return StageResult(name, folder, fp, True, 0.0, record.get("info") or {})
    if record is not None and record.get("fingerprint") != fp:
        log.debug("%s: settings or inputs changed, redoing it", name)
    t0 = time.perf_counter()
    with atomic_output_dir(folder, overwrite=True) as tmp:
        info = build(tmp) or {}
        seconds = round(time.perf_counter() - t0, 2)
        (tmp / RECORD).write_text(json.dumps({"stage": name, "fingerprint": fp, "complete": not info.get("incomplete"),
                                              "seconds": seconds, "info": info}, indent=1, default=str) + "\n")
    return StageResult(name, folder, fp, False, seconds, info)
