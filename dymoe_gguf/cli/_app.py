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


_VERBOSE, _QUIET = "dymoe.verbose", "dymoe.quiet"  # keys of click's ctx.meta, shared by nested contexts


def _set_logging(ctx: click.Context) -> None:
    level = logging.ERROR if ctx.meta.get(_QUIET) else logging.WARNING - 10 * min(ctx.meta.get(_VERBOSE, 0), 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def log_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-v/-q`` after the subcommand too (``dymoe-gguf run -v …``), added to the group's."""

    def verbose(ctx: click.Context, _param: click.Parameter, value: int) -> None:
        if value:
            ctx.meta[_VERBOSE] = ctx.meta.get(_VERBOSE, 0) + value
            _set_logging(ctx)

    def quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.meta[_QUIET] = True
            _set_logging(ctx)

    fn = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=quiet,
                      help="Errors only, no summary.")(fn)
    return click.option("-v", "--verbose", count=True, expose_value=False, callback=verbose,
                        help="More logging (-vv for debug).")(fn)


def quiet() -> bool:
    """Whether ``-q`` was given (before or after the subcommand)."""
    return bool(click.get_current_context().meta.get(_QUIET))


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="dymoe-gguf")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", "quiet_", is_flag=True, help="Errors only.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet_: bool) -> None:
    """Run Mixture-of-Experts GGUF models in less memory than they need, with llama.cpp."""
    ctx.meta[_VERBOSE], ctx.meta[_QUIET] = verbose, quiet_
    _set_logging(ctx)
