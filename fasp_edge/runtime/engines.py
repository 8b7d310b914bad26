"""One generation interface over PyTorch eager, ONNX Runtime and ExecuTorch.

An :class:`Engine` holds a KV cache and answers ``step(tokens, start) -> logits [vocab]`` for the last
position; :func:`generate` drives any engine (greedy, or sampled with a seed) and times it.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..artifacts import BACKENDS
from ..checkpoints.loading import load_model
from ..errors import FaspError, InvalidArgument
from ..models.decoder import ExportDecoder
from .bundle import artifact_path, pte_data_path
from .executorch import PteModel, set_threadpool_size, threadpool_size
from .onnx import OnnxModel

class BackendUnavailable(FaspError):
    """The runtime library for a backend is not installed or cannot load the artifact."""


class Engine(Protocol):
    name: str
    max_context: int

    def step(self, tokens: torch.Tensor, start: int) -> torch.Tensor: ...

    def reset(self) -> None: ...

    def thread_settings(self) -> dict[str, int | bool]: ...


class TorchEngine:
    """PyTorch eager over the export decoder (static KV cache), from a model in memory."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, max_context: int, threads: int | None = None):

        if threads:
            torch.set_num_threads(threads)
        self.decoder = ExportDecoder(model.eval(), max_context=max_context, cache="static")
        self.max_context = max_context

    def reset(self) -> None:
        self.decoder.reset_cache()

    def thread_settings(self) -> dict[str, int | bool]:
        """The settings as the runtime reports them back (not as asked)."""
        return {"torch_threads": torch.get_num_threads()}

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        return self.decoder(tokens.reshape(1, -1), torch.tensor([start]))[0]


def _require(module: str, what: str, package: str) -> None:
    """Refuse a backend whose runtime library is not installed (a broken install still raises its own error)."""
    if importlib.util.find_spec(module) is None:
        raise BackendUnavailable(f"{what} is not installed; pip install {package}")


class PteEngine:
    """ExecuTorch (XNNPACK) through ``executorch.runtime``; ``threads`` sizes its (process-wide) thread pool."""

    name = "pte"

    def __init__(self, path: Path, max_context: int, threads: int | None = None, data_path: Path | None = None):
        _require("executorch", "ExecuTorch", "executorch")
        if threads:
            set_threadpool_size(threads)
        self.model = PteModel(path, data_path=data_path)
        self.max_context = max_context

    def reset(self) -> None:  # positions restart at 0; the causal mask hides stale cache entries
        pass

    def thread_settings(self) -> dict[str, int | bool]:
        return {"executorch_threadpool": threadpool_size(), "torch_threads": torch.get_num_threads()}

    def step(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        return self.model.step(tokens, start)


class OnnxEngine:
    name = "onnx"

    def __init__(self, path: Path, max_context: int, threads: int | None = None):
        _require("onnxruntime", "ONNX Runtime", "onnxruntime")
        # one inter-op thread: a decoder graph is a chain, parallel branches would only compete for cores
        self.model = OnnxModel(path, threads=threads, inter_threads=1 if threads else None)
        self.max_context = max_context

    def reset(self) -> None:
        self.model.reset()

    def thread_settings(self) -> dict[str, int | bool]:
        return {**self.model.thread_settings(), "torch_threads": torch.get_num_threads()}

    def step(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        return self.model.step(tokens, start)


def open_engine(backend: str, *, bundle=None, model: torch.nn.Module | None = None, max_context: int = 512,
                threads: int | None = None) -> Engine:
    """An engine for ``backend`` over a bundle (pte, onnx) or an in-memory model (torch)."""
    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "torch":
        if model is None:
            raise InvalidArgument("--backend torch needs a model or checkpoint folder, not a bundle")
        return TorchEngine(model, max_context, threads=threads)
    if bundle is None:
        raise InvalidArgument(f"--backend {backend} needs a bundle made by `fasp-edge export`")
    if backend not in bundle.formats:
        raise InvalidArgument(f"{bundle.path} has no {backend} artifact (it has {', '.join(bundle.formats)}); "
                              f"re-export with --formats {backend}")
    return open_artifact(bundle.path, bundle.manifest, backend, threads=threads)


def open_artifact(folder: Path, manifest: dict, backend: str, *, threads: int | None = None) -> Engine:
    """An engine over the ``backend`` (pte, onnx) artifact of the bundle in ``folder`` that ``manifest`` describes
    (also a reference export's folder with a manifest written for it, e.g. optimum-onnx's)."""
    path, max_context = artifact_path(folder, manifest, backend), int(manifest["max_context"])
    if backend == "pte":
        return PteEngine(path, max_context, threads=threads, data_path=pte_data_path(folder, manifest))
    return OnnxEngine(path, max_context, threads=threads)


def open_checkpoint(source: str | None, max_context: int, *, threads: int | None = None):
    """A torch engine over a PyTorch model folder, pruned checkpoint or hub id (``None``: the embedded default);
    returns the engine and the loaded model."""

    loaded = load_model(source)
    return TorchEngine(loaded.model, max_context, threads=threads), loaded


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int]
    ttft_s: float
    decode_s: float
    total_s: float
    stopped_at_eos: bool
    step_times_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else float("nan")


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))


def generate(engine: Engine, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, eos_ids: tuple[int, ...] = (),
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Prefill ``prompt_ids`` and generate up to ``max_new_tokens`` (stopping at an EOS id)."""
    if not prompt_ids:
        raise InvalidArgument("the prompt is empty; give some text with --prompt")
    if len(prompt_ids) + max_new_tokens > engine.max_context:
        raise InvalidArgument(f"prompt ({len(prompt_ids)} tokens) plus --max-new-tokens ({max_new_tokens}) exceeds "
                              f"the exported context of {engine.max_context}; shorten them or re-export with a larger "
                              "--max-context")
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.step(torch.tensor(prompt_ids), 0)
    out = [_pick(logits, temperature, top_k, gen)]
    ttft = time.perf_counter() - t0
    if on_token:
        on_token(out[-1])
    times = []
    pos = len(prompt_ids)
    stopped = out[-1] in eos_ids
    while not stopped and len(out) < max_new_tokens:
        ts = time.perf_counter()
        logits = engine.step(torch.tensor([out[-1]]), pos)
        pos += 1
        out.append(_pick(logits, temperature, top_k, gen))
        times.append(time.perf_counter() - ts)
        if on_token:
            on_token(out[-1])
        stopped = out[-1] in eos_ids
    total = time.perf_counter() - t0
    return GenerationResult(len(prompt_ids), out, ttft, total - ttft, total, stopped, times)
