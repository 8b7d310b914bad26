"""Atomic outputs and content hashes.

Every artifact fasp-edge writes is built in a temporary sibling folder and renamed into place at the
end, so a folder at the output path is always complete; an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import OutputExists

if TYPE_CHECKING:
    import torch


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output folder unless ``overwrite`` (checked before long work)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputExists(f"output path {out} exists and is a file; choose another -o path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"output folder {out} exists and is not empty; pass --overwrite to replace it "
                           "or choose another -o path")
    return out


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block finishes without error.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``path`` is left
    as it was.
    """
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _apply_umask(tmp, 0o777)
        yield tmp
        for f in tmp.rglob("*"):  # some writers create files 0600; give them the user's usual mode
            _apply_umask(f, 0o777 if f.is_dir() else 0o666)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block finishes (the
    file is the old one or the new one, never half-written); on an error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _apply_umask(path: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(model: "torch.nn.Module") -> str:
    """Hash of a model's tensors (names, dtypes, shapes, bytes), independent of the file format."""
    import torch  # this module is otherwise standard library only (the bench child reads bundles through it)

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
