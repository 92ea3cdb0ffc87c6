"""Long commands show a progress bar on a terminal and none otherwise (or with -q / --json): run as
users run them, with stderr on a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from dymoe_gguf.bundle import Tier

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("dymoe-gguf"))


def _stderr_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=follower, timeout=600)
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not data:
                break
            chunks.append(data)
        return proc.returncode, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


@pytest.mark.skipif(not hasattr(pty, "openpty") or sys.platform == "win32", reason="needs a pseudo-terminal")
@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_a_bar_on_a_terminal_and_none_when_quiet(bundle, tmp_path, command):
    b = bundle("qwen3moe", base_tier=Tier.Q8_0, n_layer=2)
    text = str(ROOT / "data" / "heldout.txt")
    argv = [EXE, command, str(b), "--text", text, "--ctx", "64", "--chunks", "3"]
    code, err = _stderr_on_a_terminal(argv)
    assert code == 0, err
    assert f"{command}:" in err and "3/3" in err and "chunk" in err, err
    code, err = _stderr_on_a_terminal(argv + ["-q"])
    assert code == 0 and "chunk" not in err, err
    piped = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert piped.returncode == 0 and "chunk" not in piped.stderr, piped.stderr
