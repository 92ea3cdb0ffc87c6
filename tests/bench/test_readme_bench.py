"""The README's synthetic-benchmark line, run as shown: ``dymoe-gguf bench --quick --json``. The
synthetic model is built once and cached under ~/.cache/dymoe-gguf/bench (about 3.5 minutes cold on
2 cores); the run itself is a few minutes. Speed is not asserted (a benchmark reports it): the keys
the JSON promises, and that every configuration ran or says why not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme import bash_lines

pytestmark = pytest.mark.slow
EXE = str(Path(sys.executable).with_name("dymoe-gguf"))


def _readme_line() -> list[str]:
    found = [w for w in bash_lines() if w[:3] == ["dymoe-gguf", "bench", "--quick"]]
    assert len(found) == 1, found
    return found[0]


def test_readme_bench_quick_json(tmp_path):
    argv = _readme_line()
    p = subprocess.run([EXE, *argv[1:]], capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    out = json.loads(p.stdout)
    for key in ("tpot_ratio", "ttft_ratio", "tpot_ratio_tuned", "capped", "bound_ratio", "callback_share"):
        assert key in out, (key, sorted(out))
    assert out["tpot_ratio"] > 0 and out["bound_ratio"] > 0
