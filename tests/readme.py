"""The README's shell examples, as the tests that run them read them: one parser for all of them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_lines(section: str | None = None) -> list[list[str]]:
    """Every command line of the README's ```bash blocks (of the ``## section`` only, if named), as
    words, comments dropped."""
    text = README.read_text(encoding="utf-8")
    if section is not None:
        text = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [shlex.split(line, comments=True)
             for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    return [w for w in lines if w]


def variants(words: list[str]) -> list[list[str]]:
    """``[--opt X]`` parts of a line: one variant without any, one with all."""
    plain, full, inside = [], [], False
    for w in words:
        inside = inside or w.startswith("[")
        full.append(w.strip("[]"))
        if not inside:
            plain.append(w)
        inside = inside and not w.endswith("]")
    return [plain, full] if plain != full else [plain]
