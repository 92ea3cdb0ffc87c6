"""The ``dymoe-gguf`` click group and what every command shares: errors become one line, exit 1.

Library errors (:class:`~dymoe_gguf.errors.DymoeError`) become a one-line message and exit 1;
Ctrl-C exits 130. The commands live beside this module, one module per area.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from dymoe_gguf import __version__
from dymoe_gguf.errors import DymoeError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into ClickException (one line, exit 1) and Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DymoeError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was left behind.", err=True)
            sys.exit(130)

    return wrapper


def emit(data: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False) if as_json else text)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="dymoe-gguf")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def cli(verbose: int) -> None:
    """Run Mixture-of-Experts GGUF models in less memory than they need, with llama.cpp."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
