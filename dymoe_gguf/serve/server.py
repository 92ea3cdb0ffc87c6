"""``dymoe-gguf serve``: listen, open the model on its thread, serve until SIGINT/SIGTERM, close.

Order: the port is bound first (a busy port fails before the model is read), then the model is
opened, then uvicorn serves on the bound socket. SIGINT or SIGTERM starts a graceful shutdown:
running completions end at their next token, open connections get a few seconds, and the
controller is closed (every tensor restored) before the process exits with status 0.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from dymoe_gguf.errors import DymoeError, RuntimeConfigError

log = logging.getLogger(__name__)
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_SECONDS = 5  # what open connections get to finish once a shutdown starts
_EXTRA = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def check_extra() -> None:
    """Fail with one line if the ``server`` extra is not installed."""
    import importlib.util

    missing = [m for m in _EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise DymoeError(f"serve needs the server extra ({', '.join(missing)} missing): "
                         "pip install 'dymoe-gguf[server]'")


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RuntimeConfigError(f"Cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    except OSError as exc:
        sock.close()
        raise RuntimeConfigError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class _Signals:
    """SIGINT/SIGTERM noted (not raised) while the model loads and after uvicorn has stopped."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {s: signal.signal(s, self._note) for s in _SIGNALS}

    def _note(self, sig: int, _frame: FrameType | None) -> None:
        self.received = sig

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def serve(bundle: str | Path, *, host: str = "127.0.0.1", port: int = 8080, alias: str | None = None,
          n_ctx: int = 0, n_threads: int | None = None, chat_format: str | None = None,
          on_ready: Callable[[str, Any], None] | None = None, **policy: Any) -> None:
    """Serve ``bundle`` over HTTP until SIGINT/SIGTERM; ``policy`` are ``Controller.open`` options.

    ``on_ready(url, session)`` is called once the model is open, just before requests are served.
    """
    check_extra()
    import uvicorn

    from dymoe_gguf.runtime.session import Session
    from dymoe_gguf.serve.app import create_app
    from dymoe_gguf.serve.model import ModelThread

    sock = listen(host, port)
    signals = _Signals()
    try:
        model = ModelThread(lambda: Session.open(bundle, n_ctx=n_ctx, n_threads=n_threads, chat_format=chat_format,
                                                 **policy))
        try:
            if signals.received is not None:
                log.info("signal %d while loading: not serving", signals.received)
                return
            name = alias or model.session.name
            app = create_app(model, name)

            class Server(uvicorn.Server):
                def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                    model.stopping.set()  # running completions end at their next token
                    super().handle_exit(sig, frame)

            # log_config None: uvicorn's loggers go through ours (access lines with -v)
            server = Server(uvicorn.Config(app, log_config=None, log_level=None, lifespan="off",
                                           timeout_graceful_shutdown=GRACE_SECONDS))
            bound = sock.getsockname()
            shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
            if on_ready is not None:
                on_ready(f"http://{shown}:{bound[1]}", model.session)
            server.run(sockets=[sock])
        finally:
            model.stopping.set()
            model.close()
            log.info("model closed")
    finally:
        sock.close()
        signals.restore()
