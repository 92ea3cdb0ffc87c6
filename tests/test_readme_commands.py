"""Every command line of the README's bash blocks is run by a test, as shown, on the shipped model.

This module runs the lines no other module runs (``eval``, ``calibrate``, ``doctor``, set-up command
(1)) through the installed ``dymoe-gguf`` executable, and checks that every other line is claimed by a
module that reads it from the README and runs it — so a new README line without a test fails here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme import bash_lines, variants

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("dymoe-gguf"))

# first words of a README line -> the test module that runs such lines, read from the README
CLAIMED = {
    ("dymoe-gguf", "convert"): "tests/convert/test_readme.py",
    ("dymoe-gguf", "inspect"): "tests/convert/test_readme.py",
    ("dymoe-gguf", "synth"): "tests/convert/test_readme.py",
    ("dymoe-gguf", "run"): "tests/serve/test_readme.py",  # and tests/convert/test_readme.py
    ("dymoe-gguf", "chat"): "tests/serve/test_readme.py",
    ("dymoe-gguf", "serve"): "tests/serve/test_readme.py",
    ("curl",): "tests/serve/test_readme.py",
    ("dymoe-gguf", "bench", "-m"): "tests/bench/test_user.py",
    ("dymoe-gguf", "bench", "--quick"): "tests/bench/test_readme_bench.py",
    ("scripts/build_llama_native.sh",): "tests/quality/test_llama_perplexity.py",
    ("llama-perplexity",): "tests/quality/test_llama_perplexity.py",
    ("bash", "scripts/test.sh"): ".ci/run",  # CI runs it, exactly
}
HERE = {("dymoe-gguf", "eval"), ("dymoe-gguf", "calibrate"), ("dymoe-gguf", "doctor"),
        ("bash", "scripts/quickstart.sh")}


def _key(words: list[str]) -> tuple[str, ...]:
    for n in (3, 2, 1):
        if tuple(words[:n]) in CLAIMED or tuple(words[:n]) in HERE:
            return tuple(words[:n])
    raise AssertionError(f"README line with no test: {' '.join(words)}")


def test_every_readme_line_has_a_test():
    for words in bash_lines():
        key = _key(words)
        if key in CLAIMED:
            where = ROOT / CLAIMED[key]
            assert where.is_file(), (words, where)
            assert "README" in where.read_text(encoding="utf-8"), f"{where} does not run README lines"


@pytest.fixture
def world(shipped_bundle, tmp_path, monkeypatch) -> Path:
    """A working directory where the README's names exist: ``model.dymoe`` and ``tiny.dymoe`` (the
    shipped model, converted with the defaults), ``ref.gguf`` (its base file) and ``data/``."""
    shutil.copytree(shipped_bundle, tmp_path / "model.dymoe")
    (tmp_path / "tiny.dymoe").symlink_to(tmp_path / "model.dymoe")  # the name the llama-perplexity lines use
    shutil.copy(shipped_bundle / "model.gguf", tmp_path / "ref.gguf")
    (tmp_path / "data").symlink_to(ROOT / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_readme_eval_calibrate_doctor_as_shown(world):
    ran = set()
    for words in bash_lines():
        key = _key(words)
        if key not in HERE or key == ("bash", "scripts/quickstart.sh"):
            continue
        for argv in variants(words):
            p = subprocess.run([EXE, *argv[1:]], capture_output=True, text=True, timeout=900, cwd=world)
            assert p.returncode == 0, (argv, p.stdout[-1500:], p.stderr[-1500:])
            assert "Traceback" not in p.stderr, (argv, p.stderr[-1500:])
            ran.add(key)
    assert ran == HERE - {("bash", "scripts/quickstart.sh")}
    assert (world / "model.dymoe" / "calibration.gguf").is_file() and (world / "imatrix.gguf").is_file()


@pytest.mark.slow
def test_readme_setup_command_1_runs_the_default_model():
    """``bash scripts/quickstart.sh``: set-up (already done: seconds), convert, calibrate, generate."""
    p = subprocess.run(["bash", "scripts/quickstart.sh"], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert "generation" in p.stderr and "budget 4.0 MiB" in p.stderr, p.stderr[-2000:]
    assert len(p.stdout.strip()) > 20, p.stdout
