"""Converting a checkpoint into a bundle."""

from __future__ import annotations

from dymoe_gguf.convert.run import ConvertResult, convert

__all__ = ["ConvertResult", "convert"]
