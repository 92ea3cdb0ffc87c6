"""Facts about the machine a benchmark ran on (CPU, memory, kernel, storage read-ahead, llama.cpp build)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from dymoe_gguf._native import vm
from dymoe_gguf.errors import DymoeError


def machine_info(model_file: Path | None = None) -> dict[str, Any]:
    """CPU, cores, RAM, kernel, page size and the storage read-ahead (read_ahead_kb)."""

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ra = {}
    for q in sorted(Path("/sys/block").glob("*/queue/read_ahead_kb")):
        dev = q.parent.parent.name
        if not dev.startswith(("loop", "ram", "zram")):
            ra[dev] = int(q.read_text())
    model_dev = None
    if model_file is not None and Path("/sys/dev/block").is_dir():
        st = os.stat(model_file)
        p = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
        for cand in (p, p.parent):  # a partition's queue/ lives on its disk
            try:
                if (cand / "queue" / "read_ahead_kb").is_file():
                    model_dev = {"device": cand.resolve().name,
                                 "read_ahead_kb": int((cand / "queue" / "read_ahead_kb").read_text())}
                    break
            except OSError:
                pass
    import llama_cpp

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "kernel": platform.release(), "system": platform.system(), "page_size": vm.SYSTEM_PAGE,
            "read_ahead_kb": ra, "model_device": model_dev, "llama_cpp_python": llama_cpp.__version__,
            "python": platform.python_version()}


def patch_available() -> bool:
    """Whether this build of llama.cpp has the per-expert view patch."""
    from dymoe_gguf._native import patch

    try:
        return patch.load() is not None
    except DymoeError:
        return False
