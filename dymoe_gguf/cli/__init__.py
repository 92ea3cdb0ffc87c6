"""The ``dymoe-gguf`` command line: thin wrappers, one library call per command.

``_app`` holds the group and the error handling; ``convert`` (convert, inspect, synth),
``runtime`` (run, eval, calibrate), ``serve`` (chat, serve) and ``tools`` (doctor, bench) register
their commands on it.
"""

from __future__ import annotations

from dymoe_gguf.cli import convert, runtime, serve, tools  # noqa: F401 - register the commands
from dymoe_gguf.cli._app import cli


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dymoe-gguf")


__all__ = ["cli", "main"]
