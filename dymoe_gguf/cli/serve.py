"""Commands that talk with a bundle: ``chat`` (interactive, on stdin) and ``serve`` (OpenAI-compatible HTTP)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from dymoe_gguf.cli._app import CONTEXT, cli, errors, log_options, quiet
from dymoe_gguf.cli.runtime import (
    _policy_kwargs,
    _policy_options,
    model_options,
    pop_sampling,
    sampling_options,
    the_bundle,
)
from dymoe_gguf.errors import RuntimeConfigError
from dymoe_gguf.util import human_bytes

_CHAT_FORMAT = click.option("--chat-format", metavar="NAME",
                            help="llama-cpp-python chat format (chatml, llama-2, …) [default: the bundle's template].")


def _read_message(stdin: Any, interactive: bool) -> str | None:
    """One user message; a line ending in a backslash continues on the next. None at end of input."""
    lines: list[str] = []
    while True:
        if interactive:
            click.echo("> " if not lines else "… ", nl=False, err=True)
        line = stdin.readline()
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


@cli.command(context_settings=CONTEXT)
@model_options
@_CHAT_FORMAT
@click.option("-s", "--system", help="System message that starts the conversation.")
@click.option("-n", "--n-tokens", type=click.IntRange(-1, 1_000_000), default=-1, show_default=True,
              help="Most tokens per reply (-1: until the end of generation or of the context).")
@sampling_options
@_policy_options
@click.option("--stats", "show_stats", is_flag=True, help="Also print the controller's full stats at the end (JSON, "
                                                            "stderr).")
@log_options
@errors
def chat(bundle: Path | None, model: Path | None, ctx: int, threads: int | None, chat_format: str | None,
         system: str | None, n_tokens: int, show_stats: bool, **opts: Any) -> None:
    """Chat with BUNDLE: one message per line on stdin (end a line with \\ to continue it), replies streamed.

    Uses the bundle's chat template, or --chat-format. Ends at end of input (Ctrl-D) or /exit; a
    summary follows on stderr.
    """
    from dymoe_gguf.runtime.session import Session

    path = the_bundle(bundle, model)
    sampling = pop_sampling(opts)
    stdin = sys.stdin
    interactive = stdin.isatty()
    with Session.open(path, n_ctx=ctx, n_threads=threads, chat_format=chat_format, **_policy_kwargs(**opts)) as s:
        s.check_chat()
        if not quiet():
            click.echo(f"chat with {s.name} ({chat_format or 'its chat template'}, context {s.n_ctx} tokens); "
                       "end with Ctrl-D or /exit", err=True)
        messages = [{"role": "system", "content": system}] if system else []
        while True:
            text = _read_message(stdin, interactive)
            if text is None or text.strip() in ("/exit", "/quit"):
                break
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            reply = []
            try:
                for piece in s.chat(messages, max_tokens=n_tokens, sampling=sampling):
                    click.echo(piece, nl=False)
                    reply.append(piece)
            except RuntimeConfigError as exc:  # this message does not fit: say so, wait for the next one
                messages.pop()
                click.echo(f"Error: {exc}", err=True)
                continue
            click.echo()
            messages.append({"role": "assistant", "content": "".join(reply)})
        if interactive:
            click.echo(err=True)
        if not quiet():
            click.echo(s.summary(), err=True)
        if show_stats:
            click.echo(json.dumps(s.stats()), err=True)


@cli.command(context_settings=CONTEXT)
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port.")
@click.option("-a", "--alias", help="Model name in the API [default: the bundle's directory name].")
@_CHAT_FORMAT
@_policy_options
@log_options
@errors
def serve(bundle: Path | None, model: Path | None, ctx: int, threads: int | None, host: str, port: int,
          alias: str | None, chat_format: str | None, **opts: Any) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API (llama-cpp-python's server, with the controller).

    Routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /stats (JSON), /metrics
    (Prometheus). Requests are queued on the one model. SIGINT/SIGTERM shut it down cleanly.
    """
    from dymoe_gguf.serve.server import serve as run_server

    def ready(url: str, session: Any) -> None:
        if quiet():
            return
        st = session.stats()
        budget = st.get("budget_bytes")
        click.echo(f"serving {alias or session.name} on {url}/v1 (context {session.n_ctx} tokens, policy "
                   f"{st.get('policy')}, {st.get('mode')} views, budget "
                   f"{'unlimited' if budget is None else human_bytes(budget)}); Ctrl-C to stop", err=True)

    run_server(the_bundle(bundle, model), host=host, port=port, alias=alias, n_ctx=ctx, n_threads=threads,
               chat_format=chat_format, on_ready=ready, **_policy_kwargs(**opts))
