"""Hugging Face repo ids as sources, fetched through huggingface-hub's cache.

``owner/name`` holding ``config.json`` and safetensors is a checkpoint: only what conversion needs
is downloaded. A repo holding GGUFs is picked from as ``llama-cli -hf owner/name[:QUANT]`` does
(common/download.cpp): the first model file whose path contains ``QUANT`` followed by ``.`` or
``-`` (case-insensitive; ``mmproj``/``imatrix`` files are not models), the first part of a split
file, and without a tag ``Q4_K_M``, then ``Q8_0``, then the first model file. ``--revision`` picks
a branch, tag or commit. ``HF_HUB_OFFLINE=1`` and an already-populated cache are honoured;
offline without a cached copy gives a clear error instead of a network traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

from dymoe_gguf.errors import SourceError

REPO_ID_RE = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)(?::([\w.-]+))?$")
_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
_NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SPLIT_RE = re.compile(r"^(.+)-(\d{5})-of-(\d{5})$", re.IGNORECASE)
DEFAULT_TAGS = ("Q4_K_M", "Q8_0")


def looks_like_repo_id(spec: str) -> bool:
    """``owner/name`` or ``owner/name:QUANT`` that is not an existing local path."""
    return bool(REPO_ID_RE.match(spec)) and not Path(spec).exists()


def split_repo_tag(spec: str) -> tuple[str, str | None]:
    """``"owner/name:Q4_K_M"`` -> ``("owner/name", "Q4_K_M")``."""
    m = REPO_ID_RE.match(spec)
    if not m:
        raise SourceError(f"Expected a repo id such as owner/name or owner/name:Q4_K_M, got {spec!r}")
    return m.group(1), m.group(2)


def is_model_gguf(path: str) -> bool:
    """A GGUF that is a model (not a projector, importance matrix or draft head)."""
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".gguf") and not any(k in name for k in _NOT_MODELS)


def split_info(path: str) -> tuple[str, int, int]:
    """(prefix, part index, part count) of a GGUF file name; (name, 1, 1) when not split."""
    prefix = path.removesuffix(".gguf")
    m = _SPLIT_RE.match(prefix)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else (prefix, 1, 1)


def pick_gguf(files: list[str], tag: str | None) -> list[str] | None:
    """The model file(s) ``llama-cli -hf repo[:tag]`` would load: all parts of a split file, in order."""
    models = [f for f in files if is_model_gguf(f)]
    pick = None
    for t in ([tag] if tag else list(DEFAULT_TAGS)):
        rx = re.compile(re.escape(t) + r"[.-]", re.IGNORECASE)
        pick = next((f for f in models if rx.search(f) and split_info(f)[1] == 1), None)
        if pick:
            break
    if pick is None and not tag:
        pick = next((f for f in models if split_info(f)[1] == 1), None)
    if pick is None:
        return None
    prefix, _, count = split_info(pick)
    if count == 1:
        return [pick]
    return sorted(f for f in models if split_info(f)[0] == prefix and split_info(f)[2] == count)


def _hub():  # noqa: ANN202 - the module, imported lazily (it is slow to import)
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401 - a lazy attribute of the package otherwise
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise SourceError(f"huggingface-hub is needed for repo ids: {exc}") from None
    return huggingface_hub


def _offline_error(repo: str) -> SourceError:
    return SourceError(f"Cannot fetch {repo}: offline (HF_HUB_OFFLINE or no network) and not in the Hugging "
                       "Face cache; download it on a connected machine or pass a local directory")


def _call(repo: str, fn, *args, **kw):  # noqa: ANN001, ANN202 - thin wrapper turning hub errors into one line
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fn(*args, **kw)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise _offline_error(repo) from None
    except RevisionNotFoundError:
        raise SourceError(f"Cannot fetch {repo}: revision {kw.get('revision')!r} does not exist") from None
    except (RepositoryNotFoundError, EntryNotFoundError) as exc:
        raise SourceError(f"Cannot fetch {repo}: {str(exc).splitlines()[0]}") from None
    except HfHubHTTPError as exc:
        raise SourceError(f"Cannot fetch {repo}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise SourceError(f"Cannot fetch {repo}: {exc}") from None


def _list_files(repo: str, revision: str | None) -> list[str]:
    """The repo's files: from the Hub when online, else from the cached snapshot."""
    hub = _hub()
    if not hub.constants.HF_HUB_OFFLINE:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            return list(hub.HfApi().list_repo_files(repo, revision=revision))
        except RevisionNotFoundError:
            raise SourceError(f"Cannot fetch {repo}: revision {revision!r} does not exist") from None
        except RepositoryNotFoundError:
            raise SourceError(f"Cannot fetch {repo}: no such repository (or a private one: log in with "
                              "`hf auth login`)") from None
        except Exception:  # no network: fall back to the cache (as llama.cpp does)
            pass
    snap = Path(_call(repo, hub.snapshot_download, repo, revision=revision, local_files_only=True))
    return sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file() or p.is_symlink())


def fetch(spec: str, revision: str | None = None) -> Path:
    """A local checkpoint directory, or the local path of a GGUF (its first part), for ``spec``."""
    repo, tag = split_repo_tag(spec)
    hub = _hub()
    files = _list_files(repo, revision)
    is_checkpoint = "config.json" in files and any(f.endswith(".safetensors") for f in files)
    if tag is None and is_checkpoint:
        return Path(_call(repo, hub.snapshot_download, repo, revision=revision, allow_patterns=_PATTERNS))
    ggufs = [f for f in files if f.endswith(".gguf")]
    if not ggufs:
        what = "no GGUF file" if tag else "neither a checkpoint (config.json + safetensors) nor a GGUF file"
        raise SourceError(f"{repo} holds {what}" + (f" (revision {revision})" if revision else ""))
    parts = pick_gguf(files, tag)
    if parts is None:
        tags = sorted({split_info(f)[0].rsplit("-", 1)[-1].rsplit(".", 1)[-1] for f in ggufs if is_model_gguf(f)})
        raise SourceError(f"{repo} has no GGUF for {tag!r}; it has {', '.join(tags) or 'none'} "
                          f"(pass {repo}:TAG)")
    local = [Path(_call(repo, hub.hf_hub_download, repo, p, revision=revision)) for p in parts]
    return local[0]
