"""Every command of the README's run/chat/serve section (and its `run` line in "Using it") runs as shown,
on the shipped model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.readme import bash_lines
from tests.serve._helpers import Server

pytestmark = pytest.mark.slow


def _cli(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    assert argv[0] == "dymoe-gguf"
    return subprocess.run([sys.executable, "-m", "dymoe_gguf", *argv[1:]], input=stdin, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _curl(server: Server, argv: list[str]) -> None:
    url = next(a for a in argv[1:] if a.startswith("http://"))
    path = "/" + url.split("/", 3)[3]
    data = argv[argv.index("-d") + 1] if "-d" in argv else None
    if data is not None and json.loads(data).get("stream"):
        events, done = server.stream(path, json.loads(data))
        assert done and events, argv
        return
    status, _ctype, raw = server.request(path, raw=data.encode() if data else None)
    assert status == 200 and raw, (argv, raw[:300])


def test_readme_run_chat_serve(shipped_bundle, chat_bundle, tmp_path):
    commands = bash_lines("Run, chat and serve like llama.cpp's tools")
    using_it = [c for c in bash_lines("Using it") if c[:2] == ["dymoe-gguf", "run"]]
    assert len(commands) >= 8 and using_it
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The history of")
    server = None
    try:
        for argv in using_it + commands:
            sub = argv[1] if argv[0] == "dymoe-gguf" else argv[0]
            # the shipped model has no chat template: the template example runs on a copy that has one
            bundle = chat_bundle if sub == "chat" and "--chat-format" not in argv else shipped_bundle
            argv = [str(bundle) if a == "model.dymoe" else str(prompt) if a == "prompt.txt" else a for a in argv]
            if sub == "serve":
                i = argv.index("--port")
                args = argv[3:i] + argv[i + 2:]
                server = Server(bundle, tmp_path / "serve.log", *args)
            elif sub == "curl":
                assert server is not None
                _curl(server, [a.replace("127.0.0.1:8080", server.url.split("//")[1]) for a in argv])
            else:
                res = _cli(argv, stdin="Tell me about the city\n/exit\n" if sub == "chat" else None)
                assert res.returncode == 0, (argv, res.stderr[-2000:])
                assert res.stdout.strip() and "tok/s" in res.stderr, argv
                if sub == "chat" and bundle == shipped_bundle:  # the README's claim about bundles without one
                    bare = _cli(argv[: argv.index("--chat-format")])
                    assert bare.returncode == 1 and "--chat-format" in bare.stderr
    finally:
        if server is not None:
            assert server.stop(signal.SIGTERM) == 0, server.text()
