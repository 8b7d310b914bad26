"""A prune that can stop and continue: after the allocation and after each layer, what the layer loop has done
is saved in a folder, and a run with the same model, calibration and settings picks up from the last layer saved.

Pruning a 1.5B model layer by layer takes hours on a small machine; a killed or interrupted run should not start
over. The folder holds

- ``progress.json``: the run's fingerprint (the settings, the calibration windows' and the model's hashes), the
  layers done, the seconds spent so far, and the λ search's state;
- ``allocation.pt``: ``--param-reduction``'s kept widths, once decided (until then ``allocation-pass.pt`` and
  ``allocation-hidden.pt``: the pairs its pass has valued and its windows entering the next layer);
- ``layer-NNN.pt``: each pruned layer's decision (the channels kept, the λ) and its weights;
- ``hidden.pt``: the calibration windows' hidden states entering the next layer.

Every file is written to a temporary name and renamed, and ``progress.json`` last, so a run killed at any point
leaves a folder that continues from the last layer it finished. Continuing gives the same checkpoint as one
uninterrupted run (``tests/test_fasp.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgument
from ..fsutil import atomic_file, atomic_write_text
from ..models.base import ModelFamily
from .allocation import PairUnits
from .channels import LayerDecision, cut_attention, cut_mlp

FORMAT = 1


def fingerprint(settings: dict, calibration: torch.Tensor | None, model_sha256: str) -> str:
    """What must match for saved progress to be continued: the settings, the calibration windows and the model."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str).encode())
    if calibration is not None:
        t = calibration.detach().to(torch.long).contiguous()
        h.update(f"{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(model_sha256.encode())
    return h.hexdigest()


class Progress:
    """The saved state of one prune in ``folder`` (created if absent)."""

    def __init__(self, folder: str | os.PathLike, key: str):
        self.folder = Path(folder)
        self.key = key
        self.state: dict[str, Any] = {"fingerprint": key, "layers_done": 0, "seconds": 0.0}
        meta = self.folder / "progress.json"
        if meta.is_file():
            saved = json.loads(meta.read_text())
            if saved.get("fingerprint") != key:
                raise InvalidArgument(f"{self.folder} holds the progress of a prune with another model, calibration "
                                      "or settings; delete it (or give another folder) to start afresh")
            self.state = saved
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise InvalidArgument(f"{self.folder} is not empty and holds no prune progress; give an empty or new folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._t0, self._earlier = time.perf_counter(), float(self.state["seconds"])
        self.allocation_before = 0.0  # seconds the earlier runs spent in the allocation pass (allocation_pass)

    def elapsed(self) -> float:
        """Seconds spent on this prune: the earlier runs' and this one's."""
        return self._earlier + time.perf_counter() - self._t0

    @property
    def layers_done(self) -> int:
        return int(self.state["layers_done"])

    def _save(self, name: str, obj: Any) -> None:
        with atomic_file(self.folder / name) as tmp:
            torch.save(obj, tmp)

    def _load(self, name: str) -> Any:
        return torch.load(self.folder / name, map_location="cpu", weights_only=True)

    def allocation(self) -> dict[tuple[int, str], int] | None:
        if not (self.folder / "allocation.pt").is_file() or "allocation_seconds" not in self.state:
            return None
        return {(int(i), k): int(n) for (i, k), n in self._load("allocation.pt")}

    def save_allocation(self, keep: dict[tuple[int, str], int], seconds: float) -> None:
        """The allocation is decided (``seconds``: its pass and threshold, over every run)."""
        self._save("allocation.pt", [((i, k), n) for (i, k), n in sorted(keep.items())])
        self.state.update(allocation_seconds=seconds, seconds=self.elapsed())
        for key in ("allocation_layers_done", "allocation_pass_seconds"):
            self.state.pop(key, None)
        self._write_state()
        for name in ("allocation-pass.pt", "allocation-hidden.pt"):
            (self.folder / name).unlink(missing_ok=True)

    def allocation_pass(self, x: torch.Tensor | None) -> list[PairUnits]:
        """The allocation pass's pairs valued so far (and ``x``, its windows, as they enter the next layer)."""
        if not self.state.get("allocation_layers_done"):
            return []
        pairs = [PairUnits(**p) for p in self._load("allocation-pass.pt")]
        if x is not None:
            x.copy_(self._load("allocation-hidden.pt"))
        self.allocation_before = float(self.state.get("allocation_pass_seconds", 0.0))
        return pairs

    def save_allocation_pass(self, pairs: list[PairUnits], x: torch.Tensor | None, seconds: float) -> None:
        """The allocation pass valued the pairs of one more layer (``x`` holds the next layer's inputs; ``seconds``:
        this run's pass so far)."""
        self._save("allocation-pass.pt", [dataclasses.asdict(p) for p in pairs])
        if x is not None:
            self._save("allocation-hidden.pt", x)
        self.state.update(allocation_layers_done=len({p.layer for p in pairs}),
                          allocation_pass_seconds=self.allocation_before + seconds, seconds=self.elapsed())
        self._write_state()

    def _write_state(self) -> None:
        atomic_write_text(self.folder / "progress.json", json.dumps(self.state, indent=1) + "\n")

    def save_layer(self, idx: int, layer: nn.Module, decision: LayerDecision, hidden: torch.Tensor | None,
                   run_state: dict) -> None:
        """Layer ``idx`` is pruned (and ``hidden`` holds the next layer's inputs): record it."""
        self._save(f"layer-{idx:03d}.pt", {"decision": _decision_dict(decision),
                                           "weights": {k: v.detach().cpu() for k, v in layer.state_dict().items()}})
        if hidden is not None:
            self._save("hidden.pt", hidden)
        self.state.update(layers_done=idx + 1, seconds=self.elapsed(), run=run_state)
        self._write_state()

    def restore(self, family: ModelFamily, layers: nn.ModuleList, hidden: torch.Tensor | None
                ) -> tuple[list[LayerDecision], dict]:
        """Give the first ``layers_done`` layers their saved cut and weights and ``hidden`` the saved inputs of the
        next one; the saved decisions and the run's saved state (timings, the λ search's start)."""
        decisions = []
        for idx in range(self.layers_done):
            saved = self._load(f"layer-{idx:03d}.pt")
            decision = LayerDecision(**saved["decision"])
            layer = layers[idx]
            if decision.attn_keep is not None and decision.attn_keep.shape[1] != family.attention_layout(layer).v_head_dim:
                cut_attention(family, layer, decision.attn_keep)
            if decision.mlp_keep is not None and len(decision.mlp_keep) != family.ffn_dim(layer):
                cut_mlp(family, layer, decision.mlp_keep)
            layer.load_state_dict(saved["weights"])
            decisions.append(decision)
        if hidden is not None and self.layers_done:
            hidden.copy_(self._load("hidden.pt"))
        return decisions, self.state.get("run", {})


def _decision_dict(d: LayerDecision) -> dict:
    return {"mlp_keep": d.mlp_keep, "attn_keep": d.attn_keep, "mlp_damp": d.mlp_damp, "attn_damp": d.attn_damp}
