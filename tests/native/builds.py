"""Locate cmake builds of the vendored llama.cpp made by scripts/build_llama_native.sh (test-only).

Tests never start a build themselves (minutes): ``bash scripts/test.sh`` builds what the suite needs
before running pytest and sets ``DYMOE_REQUIRE_NATIVE=1``, so that a missing build fails there; a
plain ``pytest`` run skips the tests whose build is not in the cache, saying how to make it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_llama_native.sh"
C_DIR = Path(__file__).resolve().parent / "c"
VIEWS_TEST = C_DIR / "views_test.c"
FORWARD = C_DIR / "forward.c"


def build_args(variant: str, *, stock: bool = False, targets: tuple[str, ...] = (),
               drivers: tuple[Path, ...] = ()) -> list[str]:
    """Arguments of build_llama_native.sh for a variant, its targets and our C drivers."""
    args = ["--variant", variant] + (["--stock"] if stock else [])
    for t in targets:
        args += ["--target", t]
    for d in drivers:
        args += ["--driver", str(d)]
    return args


def cached_build(variant: str, *, stock: bool = False, targets: tuple[str, ...] = (),
                 drivers: tuple[Path, ...] = ()) -> Path:
    """The bin directory of a cached build; skips (or fails under DYMOE_REQUIRE_NATIVE=1) if absent."""
    args = build_args(variant, stock=stock, targets=targets, drivers=drivers)
    p = subprocess.run(["bash", str(SCRIPT), *args, "--cached-only"], capture_output=True, text=True, timeout=120)
    out = p.stdout.strip().splitlines()
    if p.returncode == 0 and out and Path(out[-1]).is_dir():
        return Path(out[-1])
    msg = (f"no cached llama.cpp build for: scripts/build_llama_native.sh {' '.join(args)} "
           f"(bash scripts/test.sh builds it){': ' + p.stderr.strip() if p.stderr.strip() else ''}")
    if os.environ.get("DYMOE_REQUIRE_NATIVE") == "1":
        pytest.fail(msg)
    pytest.skip(msg)
