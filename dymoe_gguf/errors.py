"""Errors raised by the library; the CLI turns them into one-line messages and exit codes."""

from __future__ import annotations


class DymoeError(Exception):
    """Base class of every error dymoe-gguf raises on purpose."""


class SourceError(DymoeError):
    """The conversion source is missing, unreadable or not a supported MoE checkpoint."""


class UnsupportedModelError(SourceError):
    """The source is readable but its architecture (or a dense model) is not supported."""


class BundleError(DymoeError):
    """A bundle on disk is missing, incomplete, corrupt or inconsistent."""


class OutputError(DymoeError):
    """The output location cannot be written (exists, no space, not a directory)."""


class RuntimeConfigError(DymoeError):
    """A runtime option (budget, policy, threads…) is invalid."""


class NativeLibraryError(DymoeError):
    """The llama.cpp / ggml shared libraries are missing or lack a needed symbol."""
