"""Source readers and per-architecture maps for ``dymoe-gguf convert``.

Installed as ``dymoe_gguf.converters`` (pyproject maps the top-level ``converters/`` folder there).
"""

from __future__ import annotations

from pathlib import Path

from dymoe_gguf.converters.source import Source, SourceTensor


def open_source(spec: str | Path, revision: str | None = None) -> Source:
    """Open a local HF directory, a ``.gguf`` file, or a Hugging Face repo id (``owner/name[:QUANT]``)."""
    from dymoe_gguf.converters import hub
    from dymoe_gguf.converters.gguf_source import open_gguf
    from dymoe_gguf.converters.source import open_hf_dir
    from dymoe_gguf.errors import SourceError

    text = str(spec)
    if not text.strip():
        raise SourceError("Missing source: expected a model directory, a .gguf file or a repo id")
    path = Path(text).expanduser()
    if revision is not None and not (not path.exists() and hub.looks_like_repo_id(text)):
        raise SourceError(f"--revision applies to Hugging Face repo ids, not to the local path {text}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"Source {path} is a file but not a .gguf: pass the model directory")
        return open_gguf(path)
    if not path.exists() and hub.looks_like_repo_id(text):
        local = hub.fetch(text, revision=revision)
        ident = text if revision is None else f"{text}@{revision}"
        if local.is_file():
            return open_gguf(local, kind="hf-repo", ident=f"{ident} ({local.name})")
        return open_hf_dir(local, kind="hf-repo", ident=ident)
    if not path.exists():
        raise SourceError(f"Source {text} does not exist: expected a model directory, a .gguf file or a Hugging "
                          "Face repo id (owner/name or owner/name:QUANT)")
    return open_hf_dir(path)


__all__ = ["Source", "SourceTensor", "open_source"]
