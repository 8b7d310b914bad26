"""Running an ExecuTorch ``.pte`` of this package: the kernels it needs, the process-wide thread pool, and
:class:`PteModel` (``step(tokens, start) -> logits``).

A process that loads such a program must have the ``llama::`` custom-op kernels and the
``quantized_decomposed`` kernels registered: :class:`PteModel` does it (:func:`load_runtime_ops`); call that
before handing a ``.pte`` to ``TextLLMRunner`` in a fresh process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.blocks import load_custom_ops


def _load_quantized_kernels() -> None:
    """Register the ``quantized_decomposed::*`` runtime kernels (quantized embeddings; a no-op for fp32)."""
    import executorch.kernels.quantized  # noqa: F401


def load_runtime_ops() -> None:
    """Everything a ``.pte`` of this package may call besides the portable and XNNPACK kernels."""
    load_custom_ops()
    _load_quantized_kernels()


def set_threadpool_size(threads: int) -> None:
    """Size ExecuTorch's process-wide thread pool (XNNPACK runs on it); set it before loading a program."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def threadpool_size() -> int:
    """The size of ExecuTorch's thread pool, as the runtime reports it."""
    from executorch.extension.pybindings import portable_lib

    return int(portable_lib._threadpool_get_thread_count())


class PteModel:
    """A loaded ``.pte``: ``step(tokens, start) -> logits [vocab]``.

    Without ``data_path`` it loads through ``executorch.runtime``; a program whose constants live in a
    ``.ptd`` needs ``data_path`` and loads through the pybindings (``executorch.runtime`` takes no data file).
    """

    def __init__(self, path: str | Path, data_path: str | Path | None = None):
        load_runtime_ops()
        self.data_path = None if data_path is None else str(data_path)
        if self.data_path is None:
            from executorch.runtime import Runtime, Verification

            runtime = Runtime.get()
            self.program = runtime.load_program(str(path), verification=Verification.Minimal)  # kept alive
            forward = self.program.load_method("forward")
            self._run = lambda name, inputs: (forward if name == "forward" else self.program.load_method(name)) \
                .execute(inputs)
        else:
            from executorch.extension.pybindings import portable_lib

            self.module = portable_lib._load_for_executorch(str(path), self.data_path)
            self._run = lambda name, inputs: self.module.run_method(name, tuple(inputs))

    def metadata(self, name: str):
        return self._run(name, [])[0]

    def step(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        out = self._run("forward", [tokens.to(torch.long).reshape(1, -1), torch.tensor([start], dtype=torch.long)])
        return out[0].reshape(-1)
