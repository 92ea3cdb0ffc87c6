"""``dymoe-gguf doctor``: what this machine and this llama.cpp build can do for dymoe-gguf."""

from __future__ import annotations

import glob
import os
import platform
from pathlib import Path


def _paging() -> dict[str, bool]:
    """The main paging calls, from the capability table (``platform calls`` has all of them)."""
    from dymoe_gguf._native import platform

    caps = platform.capabilities()
    return {"madvise_random": caps.madv_random, "madvise_willneed": caps.madv_willneed,
            "madvise_populate_read": caps.madv_populate_read, "madvise_pageout": caps.madv_pageout,
            "mincore": caps.mincore, "proc_self_io": caps.proc_self_io}


def _platform_calls() -> dict:
    """The capability table — each call, what it is for, whether this platform has it and what
    replaces it where not — and what is verified for this platform, and how."""
    from dymoe_gguf._native import platform

    caps = platform.capabilities()
    names = {c.field: c.name for c in platform.CALLS}
    rows = [{"call": c.name, "available": getattr(caps, c.field), "for": c.purpose, "fallback": c.fallback,
             "needed": not any(getattr(caps, f) for f in c.instead_of),
             "instead_of": [names[f] for f in c.instead_of]} for c in platform.CALLS]
    return {"system": caps.system, "machine": caps.machine, "kernel": caps.kernel, "board": caps.board,
            "page_size": caps.page_size, "calls": rows, "this_platform": platform.verified_key(caps),
            "verified": {key: {"platform": name, "how": how} for key, (name, how) in platform.VERIFIED.items()}}


def _render_platform(p: dict) -> list[str]:
    """The capability section of the plain-text report."""
    board = f", {p['board']}" if p["board"] else ""
    lines = [f"platform calls on {p['system']} {p['machine']} {p['kernel']}{board}, page {p['page_size']} B "
             "(sysconf):"]
    width = max(len(r["call"]) for r in p["calls"])
    for r in p["calls"]:
        if r["available"]:
            tail = f"yes  {r['for']}"
        elif not r["needed"]:
            tail = f"no   {r['for']}; not needed: {' and '.join(r['instead_of'])} here"
        else:
            tail = f"NO   {r['for']} -> instead: {r['fallback']}"
        lines.append(f"  {r['call']:<{width}}  {tail}")
    lines.append("verified where (* this machine):")
    for key, v in p["verified"].items():
        lines.append(f"  {'*' if key == p['this_platform'] else ' '} {v['platform']}: {v['how']}")
    return lines


AMX_WARNING = ("this build has llama.cpp's AMX buffer type, which segfaults on some Intel CPUs with AMX "
               "(llama.cpp issue 20824): dymoe-gguf loads without extra buffer types unless repack=True")


def _cpu(have_llama: bool) -> dict:
    """The CPU's features that pick llama.cpp's kernels, what this build compiled in, and whether
    llama.cpp's extra buffer types (repack, AMX) can be reached."""
    from dymoe_gguf._native import cpu

    feats, source = cpu.features()
    built = {}
    if have_llama:
        from dymoe_gguf._native.llama import build_features

        built = build_features()
    amx_built = any(v for k, v in built.items() if k.startswith("AMX"))
    return {"features": feats, "source": source, "build": sorted(k for k, v in built.items() if v),
            "amx_in_build": amx_built, "extra_buffer_types": "off unless repack=True (use_extra_bufts=False)",
            "warning": AMX_WARNING if amx_built and feats.get("AMX") else None}


def _render_cpu(c: dict) -> list[str]:
    def word(v: bool | None) -> str:
        return "yes" if v else ("no" if v is False else "unknown")

    lines = ["cpu: " + ", ".join(f"{k} {word(v)}" for k, v in c["features"].items()) + f" (from {c['source']})"]
    if c["build"]:
        lines.append("  llama.cpp build: " + " ".join(c["build"]) + ("" if c["amx_in_build"] else "; no AMX code"))
    lines.append(f"  extra buffer types (repack, AMX): {c['extra_buffer_types']}")
    if c["warning"]:
        lines.append(f"  warning: {c['warning']}")
    return lines


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
    info["cpu"] = _cpu(info.get("llama_cpp_python") is not None)
    from dymoe_gguf.bench.cgroup import cap_status

    info["memory_cap"] = cap_status()  # the benchmark's own lookup: the same answer ``bench`` acts on
    info["paging"] = _paging()
    info["read_ahead_kb"] = {Path(p).parent.parent.name: int(Path(p).read_text())
                             for p in sorted(glob.glob("/sys/block/*/queue/read_ahead_kb"))
                             if not Path(p).parent.parent.name.startswith(("loop", "zram", "ram"))}
    info["platform_calls"] = _platform_calls()
    return info


def render(info: dict) -> str:
    """Plain-text report."""
    lines = [f"dymoe-gguf {info['dymoe_gguf']} on {info['platform']} ({info['cpus']} CPUs, page {info['page_size']} B)"]
    if info.get("llama_cpp_python"):
        hot = ", C hot path" if (info["patch_version"] or 0) >= 2 else ""
        patch = (f"patched (patch API v{info['patch_version']}): per-expert views{hot}, DYMOE_NO_POPULATE"
                 if info["patched"] else "stock: per-layer views only, load reads the whole file")
        lines.append(f"llama-cpp-python {info['llama_cpp_python']} — {patch}")
        lines.append(f"  libraries {info['llama_cpp_lib']}; build key {info.get('build_key')}")
    else:
        lines.append(info.get("error", "llama-cpp-python missing"))
    lines += _render_cpu(info["cpu"])
    cap = info["memory_cap"]
    lines.append(f"memory cap: {'yes' if cap['available'] else 'no'} ({cap['how']})")
    lines.append("paging calls: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["paging"].items()))
    if info["read_ahead_kb"]:
        lines.append("storage read-ahead: " + ", ".join(f"{k} {v} KiB" for k, v in info["read_ahead_kb"].items()))
    lines += _render_platform(info["platform_calls"])
    return "\n".join(lines)
