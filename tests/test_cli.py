"""The command line: help, version, inspect, and an interrupted conversion leaving nothing behind."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dymoe_gguf import __version__
from dymoe_gguf.bundle import BundleIndex, Tier
from dymoe_gguf.cli import cli
from dymoe_gguf.errors import BundleError


def test_help_and_version():
    r = CliRunner()
    for flag in ("-h", "--help"):
        res = r.invoke(cli, [flag])
        assert res.exit_code == 0 and "convert" in res.output and "inspect" in res.output
    res = r.invoke(cli, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output
    assert r.invoke(cli, ["convert", "-h"]).exit_code == 0


def test_inspect_text_and_json(bundle):
    out = bundle("qwen3moe", base_tier=Tier.Q4_K)
    res = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["tiers"] == ["Q2_K", "Q4_K", "Q8_0"] and data["alignment"] == 16384 and data["valid"]
    per_tier = data["expert_bytes_per_tier"]
    assert per_tier["Q2_K"] < per_tier["Q4_K"] < per_tier["Q8_0"]
    assert sum(data["expert_bytes_per_layer"]["Q4_K"]) == per_tier["Q4_K"]
    text = CliRunner().invoke(cli, ["inspect", str(out)]).output
    assert "experts.Q8_0.gguf" in text and "layer 1" in text


def test_inspect_detects_foreign_sidecar(tmp_path, bundle, hf_model):
    import shutil

    from dymoe_gguf.convert import convert

    a = bundle("qwen3moe", base_tier=Tier.Q4_K)
    b = tmp_path / "b"
    convert(hf_model("qwen3moe"), b, base_tier=Tier.Q4_K, tiers=(Tier.Q2_K, Tier.Q4_K, Tier.Q8_0), threads=2)
    first = BundleIndex(b)  # valid: cached
    assert any(Path(os.environ["DYMOE_INDEX_CACHE"]).glob("*.pkl"))
    assert BundleIndex(b).to_dict() == first.to_dict()
    shutil.copy(a / "experts.Q2_K.gguf", b / "experts.Q2_K.gguf")  # same shapes, other conversion
    with pytest.raises(BundleError, match="another conversion"):  # the cached index is not reused
        BundleIndex(b)
    res = CliRunner().invoke(cli, ["inspect", str(b)])
    assert res.exit_code == 1 and "another conversion" in res.output and "Traceback" not in res.output
    (b / "experts.Q8_0.gguf").write_bytes((a / "experts.Q8_0.gguf").read_bytes()[:50000])
    try:
        BundleIndex(b)
    except BundleError as exc:
        assert "experts" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("a truncated sidecar must not validate")


def _convert_proc(src, out) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dymoe_gguf", "convert", str(src), "-o", str(out), "-q",
                             "-t", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_partial(parent, proc) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        partial = list(parent.glob(".out.partial-*"))
        if partial and any(p.stat().st_size > 1_000_000 for p in partial[0].glob("*.gguf")):
            return
        time.sleep(0.02)
    raise AssertionError("conversion finished or never started writing")


def test_interrupted_convert_leaves_no_bundle(tmp_path, hf_model):
    src = hf_model("qwen3moe", n_layer=8, n_expert=32, d=512, ff=512, seed=3)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        out = tmp_path / "out"
        proc = _convert_proc(src, out)
        _wait_for_partial(tmp_path, proc)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert proc.returncode != 0
        assert not out.exists()
        leftovers = list(tmp_path.glob(".out.partial-*"))
        if sig == signal.SIGKILL:  # nothing can clean up after SIGKILL: the partial dir is not a bundle
            assert len(leftovers) == 1 and (tmp_path / ".out.dymoe-lock").is_file()
            try:
                BundleIndex(leftovers[0])
            except BundleError:
                pass
            else:  # pragma: no cover
                raise AssertionError("a killed conversion must not leave a valid bundle")
            # the next conversion into this directory proves it dead (free lock, gone pid), removes it, says so
            res = subprocess.run([sys.executable, "-m", "dymoe_gguf", "convert", str(hf_model("qwen3moe")), "-o",
                                  str(tmp_path / "next"), "-q", "--tiers", "Q8_0"], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            assert f"removed {leftovers[0]}, left by a killed conversion (pid {proc.pid})" in res.stderr
            assert sorted(p.name for p in tmp_path.iterdir()) == ["next"]
        else:
            assert leftovers == [], proc.stdout.read().decode()
            assert b"Traceback" not in proc.stdout.read()


def test_doctor_reports_build_and_paging():
    res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["llama_cpp_python"] == "0.3.36" and info["page_size"] > 0
    assert info["paging"]["mincore"] and "memory_cap" in info
    import llama_cpp  # noqa: F401

    from dymoe_gguf._native import patch

    assert info["patched"] == (patch.load() is not None)
    text = CliRunner().invoke(cli, ["doctor"]).output
    assert "llama-cpp-python 0.3.36" in text and "paging calls" in text


PI5_CPUINFO = """processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU part	: 0xd0b
"""
SPR_FLAGS = ("flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni amx_bf16 avx512_fp16 amx_tile amx_int8\n")


def test_cpu_features_read_from_cpuinfo():
    from dymoe_gguf._native import cpu

    pi5, _ = cpu.features("aarch64", PI5_CPUINFO)  # Raspberry Pi 5, Cortex-A76
    assert pi5 == {"NEON": True, "DOTPROD": True, "FP16": True, "I8MM": False, "SVE": False}
    spr, src = cpu.features("x86_64", SPR_FLAGS)  # Sapphire Rapids
    assert spr == {"AVX2": True, "AVX-512": True, "AVX512-VNNI": True, "AMX": True} and src == "/proc/cpuinfo"
    old, _ = cpu.features("x86_64", "flags : fpu sse sse2 avx\n")
    assert not any(old.values())


def test_doctor_reports_cpu_features_and_the_build():
    """doctor's CPU line is /proc/cpuinfo's; the build line is llama.cpp's own system info; the wheel
    has no AMX code and extra buffer types stay off."""
    import llama_cpp

    info = json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).output)["cpu"]
    if Path("/proc/cpuinfo").is_file() and platform.machine() == "x86_64":
        flags = Path("/proc/cpuinfo").read_text()
        assert info["features"]["AVX2"] == (" avx2" in flags) and info["features"]["AMX"] == (" amx_tile" in flags)
    system = llama_cpp.llama_print_system_info().decode()
    assert info["build"] and all(f"{name} = 1" in system for name in info["build"])
    assert not info["amx_in_build"] and info["warning"] is None
    text = CliRunner().invoke(cli, ["doctor"]).output
    assert "cpu: " in text and "extra buffer types (repack, AMX): off" in text
