#!/usr/bin/env bash
# Build and install llama-cpp-python 0.3.36 with the dymoe-gguf patches (patches/*.patch).
#
# usage: scripts/build_llama_cpp.sh [--stock] [--wheel-only] [--cached-only] PY
#   PY             python of the target venv (the wheel is built and installed with PY -m pip)
#   --stock        build without the patches (a different cache key)
#   --wheel-only   build (or find) the wheel and print its path; do not install it
#   --cached-only  never build: print the cached wheel's path, or nothing (exit 0) if there is none
#
# Fetches the pinned sdist once into $DYMOE_CACHE/sdist (default ~/.cache/dymoe-gguf), extracts it to
# a temporary directory, checks and applies every patches/*.patch in order, builds a wheel into
# $DYMOE_CACHE/wheels/<key>/ and installs it. key = sha256 of (sdist sha256, every patch's contents,
# uname -m, PY's version), so a second run finds the wheel and, if it is already installed, does
# nothing. Prints the wheel path on the last line of stdout.
set -euo pipefail

usage() { echo "usage: $0 [--stock] PY" >&2; exit 2; }

STOCK=0
WHEEL_ONLY=0
CACHED_ONLY=0
PY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --stock) STOCK=1 ;;
        --wheel-only) WHEEL_ONLY=1 ;;
        --cached-only) CACHED_ONLY=1; WHEEL_ONLY=1 ;;
        -h|--help) usage ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) [ -z "$PY" ] || usage; PY="$1" ;;
    esac
    shift
done
[ -n "$PY" ] || usage
command -v "$PY" >/dev/null 2>&1 || { echo "error: python not found: $PY" >&2; exit 2; }
PY="$(command -v "$PY")"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
# shellcheck source=scripts/llama_sdist.sh
. "$HERE/llama_sdist.sh"

log() { echo "build_llama_cpp: $*" >&2; }

# ---- the sdist, the patches and the cache key -----------------------------------------------
sdist_fetch
patch_list "$STOCK"
PYVER="$("$PY" -c 'import sys; print(sys.version)')"
# No AMX code in the wheel: llama.cpp's AMX buffer type crashes on some Intel CPUs (issue 20824
# upstream), and GGML_NATIVE's -march=native would compile it in on any CPU that has AMX. The
# runtime also never asks for extra buffer types; this protects plain llama_cpp.Llama users too.
AMX_OFF=""
if [ "$(uname -m)" = x86_64 ]; then
    AMX_OFF="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# macOS: the patches are for the CPU backend, so Metal stays off for now (llama.cpp turns it on there).
PLATFORM_CMAKE=""
if [ "$(uname -s)" = Darwin ]; then
    PLATFORM_CMAKE="-DGGML_METAL=OFF"
fi
NPROC="$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)"
KEY="$(
    {
        sdist_key_lines
        echo "arch $(uname -m)"
        echo "python $PYVER"
        echo "cflags $AMX_OFF"
        [ -z "$PLATFORM_CMAKE" ] || echo "cmake $PLATFORM_CMAKE"
    } | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:32])'
)"
WHEEL_DIR="$CACHE/wheels/$KEY"

find_wheel() { ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true; }

# ---- build (skipped when the wheel for this key exists) --------------------------------------
WHEEL="$(find_wheel)"
if [ -z "$WHEEL" ] && [ "$CACHED_ONLY" = 1 ]; then
    exit 0
fi
if [ -z "$WHEEL" ]; then
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/dymoe-llama-build.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
    sdist_extract_patched "$WORK"
    log "building wheel (key $KEY), this takes several minutes"
    mkdir -p "$WHEEL_DIR.tmp"
    rm -f "$WHEEL_DIR.tmp"/*.whl
    start=$(date +%s)
    CMAKE_ARGS="${CMAKE_ARGS:-}${PLATFORM_CMAKE:+ $PLATFORM_CMAKE}${AMX_OFF:+ -DCMAKE_C_FLAGS='$AMX_OFF' -DCMAKE_CXX_FLAGS='$AMX_OFF'}" \
        CMAKE_BUILD_PARALLEL_LEVEL="$NPROC" "$PY" -m pip wheel --no-deps "$SRC" -w "$WHEEL_DIR.tmp" >&2
    log "wheel built in $(( $(date +%s) - start )) s"
    rm -rf "$WHEEL_DIR"
    mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
    WHEEL="$(find_wheel)"
    [ -n "$WHEEL" ] || { echo "error: pip wheel produced no wheel in $WHEEL_DIR" >&2; exit 1; }
fi

if [ "$WHEEL_ONLY" = 1 ]; then
    echo "$WHEEL"
    exit 0
fi

# ---- install (skipped when this wheel is already installed) ----------------------------------
installed_key() {
    "$PY" - <<'EOF' 2>/dev/null || true
import importlib.util, os
spec = importlib.util.find_spec("llama_cpp")
if spec and spec.submodule_search_locations:
    p = os.path.join(list(spec.submodule_search_locations)[0], ".dymoe_build_key")
    if os.path.exists(p):
        print(open(p).read().strip())
EOF
}
if [ "$(installed_key)" != "$KEY" ]; then
    log "installing $(basename "$WHEEL")"
    "$PY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL" >&2
    PKG_DIR="$("$PY" -c 'import importlib.util,os; s=importlib.util.find_spec("llama_cpp"); print(list(s.submodule_search_locations)[0])')"
    echo "$KEY" > "$PKG_DIR/.dymoe_build_key"
else
    log "already installed ($KEY)"
fi
echo "$WHEEL"
