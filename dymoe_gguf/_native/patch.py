"""Per-expert views of the patched llama.cpp (patches/0001), bound through ctypes.

The patch exports from libggml-cpu:
    int  dymoe_patch_version(void);
    int  dymoe_expert_view_set(const struct ggml_tensor * w, int32_t expert, enum ggml_type type,
                               const void * data, size_t nb1);
    int  dymoe_expert_view_clear(const struct ggml_tensor * w);
    void dymoe_expert_view_clear_all(void);
    int  dymoe_expert_view_count(void);
The copy of libggml-cpu that libllama already loaded must be used (the wheel ships both
libggml-cpu.so and libggml-cpu.so.0; opening the other file gives a second, unused table).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from dymoe_gguf._native import vm
from dymoe_gguf.errors import NativeLibraryError


class ExpertViews:
    """Thin wrapper over the patch's C API."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.version = int(lib.dymoe_patch_version())

    def set(self, tensor: int, expert: int, ggml_type: int, data: int, nb1: int) -> None:
        rc = self.lib.dymoe_expert_view_set(tensor, expert, ggml_type, data, nb1)
        if rc != 0:
            raise NativeLibraryError(f"dymoe_expert_view_set failed ({rc}) for expert {expert}")

    def drop(self, tensor: int, expert: int) -> None:
        """Expert ``expert`` reads the tensor's own data again."""
        rc = self.lib.dymoe_expert_view_set(tensor, expert, 0, None, 0)
        if rc != 0:
            raise NativeLibraryError(f"dymoe_expert_view_set(NULL) failed ({rc}) for expert {expert}")

    def clear(self, tensor: int) -> None:
        self.lib.dymoe_expert_view_clear(tensor)

    def count(self) -> int:
        return int(self.lib.dymoe_expert_view_count())


def _loaded_cpu_lib() -> ctypes.CDLL | None:
    import llama_cpp  # loads libllama and, through it, libggml-cpu

    path = vm.mapped_library("libggml-cpu")  # the copy libllama loaded, where the platform lists mappings
    names = ["libggml-cpu.so.0", "libggml-cpu.so", "libggml-cpu.dylib"]
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    # RTLD_NOLOAD: only a library already loaded is returned, never a second copy
    flags = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_GLOBAL", 0)
    for cand in ([path] if path else []) + names + [str(lib_dir / n) for n in names]:
        try:
            return ctypes.CDLL(cand, mode=flags)
        except OSError:
            continue
    return None


def load() -> ExpertViews | None:
    """The patch's API if this llama.cpp build has it, else None (stock build)."""
    lib = _loaded_cpu_lib()
    if lib is None or not hasattr(lib, "dymoe_patch_version"):
        return None
    lib.dymoe_patch_version.restype = ctypes.c_int
    lib.dymoe_expert_view_set.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int, ctypes.c_void_p,
                                          ctypes.c_size_t]
    lib.dymoe_expert_view_set.restype = ctypes.c_int
    lib.dymoe_expert_view_clear.argtypes = [ctypes.c_void_p]
    lib.dymoe_expert_view_clear.restype = ctypes.c_int
    lib.dymoe_expert_view_count.restype = ctypes.c_int
    return ExpertViews(lib)
