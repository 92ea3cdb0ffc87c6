"""``dymoe-gguf doctor``: what this machine and this llama.cpp build can do for dymoe-gguf."""

from __future__ import annotations

import glob
import os
import platform
import tempfile
from pathlib import Path


def _paging() -> dict[str, bool]:
    """Try each paging call on a small temporary file."""
    from dymoe_gguf._native import vm

    out = {}
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR")) as f:
        f.write(os.urandom(4 * vm.PAGE))
        f.flush()
        m = vm.Mapping.open(f.name)
        try:
            out["madvise_random"] = m.advise(0, m.size, vm.MADV_RANDOM) == 0
            out["madvise_willneed"] = m.advise(0, m.size, vm.MADV_WILLNEED) == 0
            out["madvise_populate_read"] = vm.IS_LINUX and m.advise(0, m.size, vm.MADV_POPULATE_READ) == 0
            out["madvise_pageout"] = vm.IS_LINUX and m.advise(0, m.size, vm.MADV_PAGEOUT) == 0
            try:
                m.residency()
                out["mincore"] = True
            except OSError:
                out["mincore"] = False
        finally:
            m.close()
    out["proc_self_io"] = Path("/proc/self/io").is_file()
    return out


def diagnose() -> dict:
    """Everything ``doctor`` reports, as a dict."""
    from dymoe_gguf import __version__
    from dymoe_gguf._native import vm

    info: dict = {"dymoe_gguf": __version__, "platform": platform.platform(), "machine": platform.machine(),
                  "cpus": os.cpu_count(), "page_size": vm.PAGE}
    try:
        import llama_cpp

        from dymoe_gguf._native import patch

        views = patch.load()
        info["llama_cpp_python"] = llama_cpp.__version__
        info["llama_cpp_lib"] = str(Path(llama_cpp.__file__).parent / "lib")
        info["patched"] = views is not None
        info["patch_version"] = views.version if views is not None else None
        info["views"] = "per-expert" if views is not None else "per-layer"
        key = Path(llama_cpp.__file__).parent / ".dymoe_build_key"
        info["build_key"] = key.read_text().strip() if key.is_file() else None
    except ImportError as exc:
        info["llama_cpp_python"] = None
        info["error"] = f"llama-cpp-python does not import: {exc}"
    from dymoe_gguf.bench.cgroup import cap_status

    info["memory_cap"] = cap_status()  # the benchmark's own lookup: the same answer ``bench`` acts on
    info["paging"] = _paging()
    info["read_ahead_kb"] = {Path(p).parent.parent.name: int(Path(p).read_text())
                             for p in sorted(glob.glob("/sys/block/*/queue/read_ahead_kb"))
                             if not Path(p).parent.parent.name.startswith(("loop", "zram", "ram"))}
    return info


def render(info: dict) -> str:
    """Plain-text report."""
    lines = [f"dymoe-gguf {info['dymoe_gguf']} on {info['platform']} ({info['cpus']} CPUs, page {info['page_size']} B)"]
    if info.get("llama_cpp_python"):
        patch = (f"patched (patch API v{info['patch_version']}): per-expert views, DYMOE_NO_POPULATE"
                 if info["patched"] else "stock: per-layer views only, load reads the whole file")
        lines.append(f"llama-cpp-python {info['llama_cpp_python']} — {patch}")
        lines.append(f"  libraries {info['llama_cpp_lib']}; build key {info.get('build_key')}")
    else:
        lines.append(info.get("error", "llama-cpp-python missing"))
    cap = info["memory_cap"]
    lines.append(f"memory cap: {'yes' if cap['available'] else 'no'} ({cap['how']})")
    lines.append("paging calls: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["paging"].items()))
    if info["read_ahead_kb"]:
        lines.append("storage read-ahead: " + ", ".join(f"{k} {v} KiB" for k, v in info["read_ahead_kb"].items()))
    return "\n".join(lines)
