"""Hugging Face repo ids as sources, fetched through huggingface-hub's cache.

``HF_HUB_OFFLINE=1`` and an already-populated cache are honoured by huggingface-hub itself;
offline without a cached copy gives a clear error instead of a network traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

from dymoe_gguf.errors import SourceError

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


def looks_like_repo_id(spec: str) -> bool:
    """``owner/name`` that is not an existing local path."""
    return bool(REPO_ID_RE.match(spec)) and not Path(spec).exists()


def fetch(repo_id: str, revision: str | None = None) -> Path:
    """Local snapshot directory of ``repo_id`` (downloading only what conversion needs)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise SourceError(f"huggingface-hub is needed for repo ids: {exc}") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_PATTERNS))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise SourceError(f"Cannot fetch {repo_id}: offline (HF_HUB_OFFLINE or no network) and not in the "
                          "Hugging Face cache; download it on a connected machine or pass a local directory") from None
    except HfHubHTTPError as exc:
        raise SourceError(f"Cannot fetch {repo_id}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise SourceError(f"Cannot fetch {repo_id}: {exc}") from None
