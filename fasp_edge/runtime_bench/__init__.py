"""Running and measuring models: one generation interface over PyTorch, ONNX Runtime and ExecuTorch."""

from .engines import BACKENDS, Engine, GenerationResult, generate, open_engine

__all__ = ["BACKENDS", "Engine", "GenerationResult", "generate", "open_engine"]
