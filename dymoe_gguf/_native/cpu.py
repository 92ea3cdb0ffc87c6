"""The CPU features that decide which llama.cpp kernels run, from the system (for ``doctor``).

Linux: the ``flags`` (x86) or ``Features`` (aarch64) line of ``/proc/cpuinfo``. macOS: ``sysctl``'s
``hw.optional.*`` keys (Apple Silicon and Intel Macs). Elsewhere the features are unknown (``None``),
never guessed from the architecture name.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

# feature -> the /proc/cpuinfo flags (any of them) and the macOS sysctl keys (any set to 1)
X86 = {
    "AVX2": (("avx2",), ("hw.optional.avx2_0",)),
    "AVX-512": (("avx512f",), ("hw.optional.avx512f",)),
    "AVX512-VNNI": (("avx512_vnni", "avx512vnni"), ("hw.optional.avx512vnni",)),
    "AMX": (("amx_tile", "amx_int8"), ()),
}
ARM = {
    "NEON": (("asimd",), ("hw.optional.neon", "hw.optional.AdvSIMD")),
    "DOTPROD": (("asimddp",), ("hw.optional.arm.FEAT_DotProd",)),
    "FP16": (("asimdhp", "fphp"), ("hw.optional.arm.FEAT_FP16", "hw.optional.neon_fp16")),
    "I8MM": (("i8mm",), ("hw.optional.arm.FEAT_I8MM",)),
    "SVE": (("sve",), ()),
}


def _table(machine: str) -> dict:
    m = machine.lower()
    if m in ("x86_64", "amd64", "i386", "i686"):
        return X86
    if m in ("aarch64", "arm64") or m.startswith("armv8"):
        return ARM
    return {}


def _cpuinfo_flags(text: str) -> set[str] | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def _sysctl(key: str) -> bool | None:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() == "1" if out.returncode == 0 and out.stdout.strip() else None


def features(machine: str | None = None, cpuinfo: str | None = None) -> tuple[dict[str, bool | None], str]:
    """``({feature: present, or None if unknown}, where it was read)`` for this CPU. ``machine`` and
    ``cpuinfo`` (a ``/proc/cpuinfo`` text) replace the system's, for tests."""
    machine = machine or platform.machine()
    table = _table(machine)
    if cpuinfo is None and Path("/proc/cpuinfo").is_file():
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    flags = _cpuinfo_flags(cpuinfo) if cpuinfo else None
    if flags is not None:
        return {f: any(x in flags for x in names) for f, (names, _keys) in table.items()}, "/proc/cpuinfo"
    if platform.system() == "Darwin":
        out: dict[str, bool | None] = {}
        for f, (_names, keys) in table.items():
            vals = [_sysctl(k) for k in keys]
            out[f] = True if any(vals) else (False if any(v is False for v in vals) else None)
        return out, "sysctl hw.optional"
    return {f: None for f in table}, "unknown on this system"
