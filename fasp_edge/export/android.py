"""Getting a bundle onto a phone for the demo app (``fasp-edge push-android``).

The app (android_demo/) reads bundles from its own external files folder, which ``adb push`` can write
without any storage permission: ``/sdcard/Android/data/org.faspedge.demo/files/bundles/<name>/``.
Only the files the manifest lists (and the manifest) are pushed, after their hashes are checked here.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from ..artifacts import FORMATS, KINDS
from ..errors import InvalidArgument
from ..runtime.bundle import load_bundle

APP_ID = "org.faspedge.demo"
DEVICE_BUNDLES = f"/sdcard/Android/data/{APP_ID}/files/bundles"
# what the app runs (android_demo/core Backend.kt): format -> the quantizations it accepts
APP_ACCEPTS = {f: tuple(k.quant for k in KINDS if k.format == f and k.android) for f in FORMATS}


def push_commands(bundle_path: str | Path, *, name: str | None = None, serial: str | None = None) -> list[list[str]]:
    """The adb commands that copy a verified bundle into the app's bundle folder."""
    bundle = load_bundle(bundle_path)  # every file against its sha256 first: never push a damaged copy
    q = bundle.manifest["quantization"]
    usable = [f for f in bundle.formats if q in APP_ACCEPTS[f]]
    if not usable:
        raise InvalidArgument(f"{bundle_path}: the app runs pte ({', '.join(APP_ACCEPTS['pte'])}) or onnx "
                              f"({', '.join(APP_ACCEPTS['onnx'])}); this bundle has {', '.join(bundle.formats)} "
                              f"with quantization {q}")
    name = name or bundle.path.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise InvalidArgument(f"--name {name!r}: give a plain folder name")
    adb = ["adb"] + (["-s", serial] if serial else [])
    target = f"{DEVICE_BUNDLES}/{name}"
    files = [str(bundle.path / "manifest.json")] + [str(bundle.path / f) for f in sorted(bundle.manifest["files"])]
    return [adb + ["shell", "rm", "-rf", target], adb + ["shell", "mkdir", "-p", target], adb + ["push", *files, target + "/"]]


def run_commands(commands: list[list[str]]) -> None:
    if shutil.which(commands[0][0]) is None:
        raise InvalidArgument("adb is not on PATH; install Android platform-tools (or run the printed commands "
                              "where adb is), then connect the phone with USB debugging on")
    for cmd in commands:
        res = subprocess.run(cmd)
        if res.returncode != 0:
            raise InvalidArgument(f"`{shlex.join(cmd)}` failed (exit {res.returncode}); is the phone connected "
                                  "(adb devices) and the demo app installed?")
