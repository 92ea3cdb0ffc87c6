"""dymoe-gguf: dynamic, importance-aware expert precision for MoE models on llama.cpp."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Controller", "__version__"]


def __getattr__(name: str):
    if name == "Controller":  # lazy: importing the package must not load llama.cpp
        from dymoe_gguf.runtime.controller import Controller

        return Controller
    raise AttributeError(name)
