"""Per-architecture maps; each module exports ``SPEC`` (an :class:`ArchSpec`)."""

from __future__ import annotations

from dymoe_gguf.converters.arch import mixtral, olmoe, qwen2moe, qwen3moe
from dymoe_gguf.converters.arch._common import ArchSpec
from dymoe_gguf.errors import UnsupportedModelError

ARCHS: tuple[ArchSpec, ...] = (mixtral.SPEC, olmoe.SPEC, qwen2moe.SPEC, qwen3moe.SPEC)
_BY_HF = {hf: spec for spec in ARCHS for hf in spec.hf_architectures}
_BY_GGUF = {spec.gguf_arch: spec for spec in ARCHS}


def supported() -> str:
    """Human-readable list of supported architectures."""
    return ", ".join(f"{s.name} ({'/'.join(s.hf_architectures)})" for s in ARCHS)


def for_hf(architectures: list[str] | None) -> ArchSpec:
    """The spec for a config.json ``architectures`` list."""
    for a in architectures or []:
        if a in _BY_HF:
            return _BY_HF[a]
    found = ", ".join(architectures or []) or "none declared"
    raise UnsupportedModelError(f"Unsupported architecture ({found}); supported: {supported()}")


def for_gguf(arch: str) -> ArchSpec:
    """The spec for a GGUF ``general.architecture`` value."""
    if arch in _BY_GGUF:
        return _BY_GGUF[arch]
    raise UnsupportedModelError(f"Unsupported GGUF architecture {arch!r}; supported: "
                                f"{', '.join(sorted(_BY_GGUF))}")


__all__ = ["ARCHS", "ArchSpec", "for_gguf", "for_hf", "supported"]
