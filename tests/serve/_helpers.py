"""A real ``dymoe-gguf serve`` in a subprocess on a free loopback port, and a bundle with a chat template."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# a tiny chat template (the shipped model has none); llama.cpp's gguf-new-metadata adds it to a copy
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def with_chat_template(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` whose base GGUF carries :data:`TEMPLATE` as ``tokenizer.chat_template``."""
    out.mkdir(parents=True)
    for f in bundle.iterdir():
        if f.name != "model.gguf":
            shutil.copy(f, out / f.name)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(bundle / "model.gguf"),
                    str(out / "model.gguf"), "--chat-template", TEMPLATE], check=True, capture_output=True)
    return out


class Server:
    """``python -m dymoe_gguf serve BUNDLE --port 0 ARGS`` and a small HTTP client for it."""

    def __init__(self, bundle: Path, log: Path, *args: str) -> None:
        self.log = log
        self._fh = open(log, "wb")  # closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "dymoe_gguf", "serve", str(bundle), "--port", "0",
                                      *args], stdout=self._fh, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_ready()
        self.port = int(self.url.rsplit(":", 1)[1])

    def _wait_ready(self, timeout: float = 240) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(r"on (http://[^/\s]+)/v1", self.text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, path: str, body: Any = None, raw: bytes | None = None, timeout: float = 120) -> tuple:
        """(status, content type, body bytes); 4xx/5xx answers are returned, not raised."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers.get("content-type", ""), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("content-type", ""), e.read()

    def json(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _ctype, data = self.request(path, body, **kw)
        return status, json.loads(data)

    def stream(self, path: str, body: dict, on_event=None, timeout: float = 300) -> tuple[list[dict], bool]:
        """Server-sent events of a streaming request: (the JSON events, whether ``[DONE]`` came)."""
        req = urllib.request.Request(self.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        events: list[dict] = []
        with urllib.request.urlopen(req, timeout=timeout) as r:
            assert r.headers.get("content-type", "").startswith("text/event-stream")
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return events, True
                events.append(json.loads(data))
                if on_event is not None:
                    on_event(events)
        return events, False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig``; the exit status (the process is killed if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
        return self.proc.returncode
