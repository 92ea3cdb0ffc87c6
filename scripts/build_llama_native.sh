#!/usr/bin/env bash
# Build the llama.cpp vendored in the pinned llama-cpp-python sdist with cmake, for one variant and
# only the targets asked for; cached, so a second run takes seconds.
#
# usage: scripts/build_llama_native.sh [--stock] --variant V [--target T]... [--driver FILE.c]...
#                                      [--cached-only] [--key]
#   --variant V     x86-native       this x86-64 CPU (-march=native, as the wheel is built)
#                   x86-avx2         x86-64 AVX2+FMA+F16C, no AVX-512 (another SIMD path on the same CPU)
#                   x86-scalar       x86-64 baseline, no SSE4.2/AVX/F16C/FMA: ggml's generic C kernels
#                   aarch64-a76      Raspberry Pi 5 (-mcpu=cortex-a76: NEON, dotprod, fp16), cross-built
#                   aarch64-armv8.2  generic armv8.2-a (-march=armv8.2-a: NEON, no dotprod), cross-built
#   --stock         without patches/ (its own cache key)
#   --target T      a cmake target: llama-perplexity, llama, ggml-cpu, ggml, ... (repeatable)
#   --driver F.c    one of our C test programs, compiled against the built libraries into the same
#                   directory (named after the file): ggml, plus libllama if it includes llama.h
#   --cached-only   build nothing: print the directory if every target and driver is already there,
#                   else nothing (exit 0)
#   --key           print the cache key and exit
#
# Prints, on the last line of stdout, the directory holding the shared libraries, tools and drivers
# (<cache>/native/<key>/build/bin): point LLAMA_CPP_LIB_PATH at it to run llama-cpp-python on it.
#
# Cache: ${DYMOE_CACHE:-~/.cache/dymoe-gguf}/native/<key>/ holds the patched source tree (src/) and
# the cmake build tree (build/), kept so that asking for more targets later builds only those.
# key = sha256 of (sdist sha256, each patch's name and contents, variant, cmake arguments, the C and
# C++ compilers' versions, cmake's version). A lock (flock) serialises runs on one key. Drivers are
# recompiled when their source or flags change (a stamp beside each binary).
#
# AMX and repack: the x86-native build compiles llama.cpp's AMX code on an AMX CPU, as the wheel
# does; nothing built here is run with extra buffer types: tools take --no-repack and our drivers load
# with use_extra_bufts = false (the product's own setting; llama.cpp issue 20824).
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

STOCK=0
VARIANT=""
TARGETS=()
DRIVERS=()
CACHED_ONLY=0
PRINT_KEY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --stock) STOCK=1 ;;
        --variant) [ $# -ge 2 ] || usage; VARIANT="$2"; shift ;;
        --variant=*) VARIANT="${1#*=}" ;;
        --target) [ $# -ge 2 ] || usage; TARGETS+=("$2"); shift ;;
        --target=*) TARGETS+=("${1#*=}") ;;
        --driver) [ $# -ge 2 ] || usage; DRIVERS+=("$2"); shift ;;
        --driver=*) DRIVERS+=("${1#*=}") ;;
        --cached-only) CACHED_ONLY=1 ;;
        --key) PRINT_KEY=1 ;;
        -h|--help) usage ;;
        *) echo "error: unknown argument $1" >&2; usage ;;
    esac
    shift
done
[ -n "$VARIANT" ] || { echo "error: --variant is required" >&2; usage; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
if [ -z "${PY:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
# shellcheck source=scripts/llama_sdist.sh
. "$HERE/llama_sdist.sh"

log() { echo "build_llama_native: $*" >&2; }

for d in ${DRIVERS[@]+"${DRIVERS[@]}"}; do
    [ -f "$d" ] || { echo "error: driver source not found: $d" >&2; exit 2; }
done

# ---- the variant: compilers and cmake arguments ---------------------------------------------
HOST_ARCH="$(uname -m)"
GENERATOR="Unix Makefiles"
if command -v ninja >/dev/null 2>&1; then GENERATOR=Ninja; fi
CMAKE_ARGS=(
    -G "$GENERATOR" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
)
ARCH_CFLAGS=""
case "$VARIANT" in
    x86-native|x86-avx2|x86-scalar)
        [ "$HOST_ARCH" = x86_64 ] || { echo "error: variant $VARIANT needs an x86_64 host (this is $HOST_ARCH)" >&2; exit 2; }
        CC="${CC:-gcc}"; CXX="${CXX:-g++}"
        if [ "$VARIANT" = x86-native ]; then
            CMAKE_ARGS+=(-DGGML_NATIVE=ON)
        elif [ "$VARIANT" = x86-scalar ]; then
            # the generic C kernels of every op (what a CPU without a SIMD path of its own runs)
            CMAKE_ARGS+=(-DGGML_NATIVE=OFF -DGGML_SSE42=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_BMI2=OFF
                         -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_AVX512=OFF)
        else
            # GGML_NATIVE=OFF turns on SSE4.2, AVX, AVX2, BMI2, FMA and F16C and leaves AVX-512 off
            CMAKE_ARGS+=(-DGGML_NATIVE=OFF -DGGML_AVX512=OFF)
        fi
        ;;
    aarch64-a76|aarch64-armv8.2)
        if [ "$HOST_ARCH" = aarch64 ]; then
            CC="${CC:-gcc}"; CXX="${CXX:-g++}"
        else
            CC="${CC:-aarch64-linux-gnu-gcc}"; CXX="${CXX:-aarch64-linux-gnu-g++}"
            CMAKE_ARGS+=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
                         -DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu
                         -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER
                         -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY
                         -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY)
        fi
        if [ "$VARIANT" = aarch64-a76 ]; then ARCH_CFLAGS="-mcpu=cortex-a76"; else ARCH_CFLAGS="-march=armv8.2-a"; fi
        CMAKE_ARGS+=(-DGGML_NATIVE=OFF "-DCMAKE_C_FLAGS=$ARCH_CFLAGS" "-DCMAKE_CXX_FLAGS=$ARCH_CFLAGS")
        ;;
    *) echo "error: unknown variant '$VARIANT' (x86-native, x86-avx2, x86-scalar, aarch64-a76, aarch64-armv8.2)" >&2; exit 2 ;;
esac
command -v "$CC" >/dev/null 2>&1 || { echo "error: C compiler not found: $CC (aarch64: apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)" >&2; exit 2; }
command -v "$CXX" >/dev/null 2>&1 || { echo "error: C++ compiler not found: $CXX" >&2; exit 2; }
command -v cmake >/dev/null 2>&1 || { echo "error: cmake not found" >&2; exit 2; }
CMAKE_ARGS+=("-DCMAKE_C_COMPILER=$CC" "-DCMAKE_CXX_COMPILER=$CXX")

# ---- the cache key --------------------------------------------------------------------------
sdist_fetch
patch_list "$STOCK"
KEY_TEXT="$(
    sdist_key_lines
    echo "variant $VARIANT"
    printf 'cmake-arg %s\n' "${CMAKE_ARGS[@]}"
    echo "cc $("$CC" --version | head -n1)"
    echo "cxx $("$CXX" --version | head -n1)"
    echo "cmake $(cmake --version | head -n1)"
    [ "$VARIANT" != x86-native ] || echo "cpu $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')"
)"
KEY="$VARIANT-$([ "$STOCK" = 1 ] && echo stock || echo patched)-$(printf '%s\n' "$KEY_TEXT" | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:20])')"
if [ "$PRINT_KEY" = 1 ]; then echo "$KEY"; exit 0; fi
DIR="$CACHE/native/$KEY"
BIN="$DIR/build/bin"

# ---- what is already there ------------------------------------------------------------------
driver_name() { basename "$1" .c; }
driver_stamp() { { sha256_of "$1"; echo "$CC $ARCH_CFLAGS"; } | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'; }
target_built() {  # a library target: lib<T>.so; an executable: <T>
    [ -e "$BIN/lib$1.so" ] || [ -x "$BIN/$1" ]
}
all_cached() {
    [ -f "$DIR/build/.configured" ] || return 1
    local t d
    for t in ${TARGETS[@]+"${TARGETS[@]}"}; do target_built "$t" || return 1; done
    for d in ${DRIVERS[@]+"${DRIVERS[@]}"}; do
        [ -x "$BIN/$(driver_name "$d")" ] && [ "$(cat "$BIN/$(driver_name "$d").stamp" 2>/dev/null)" = "$(driver_stamp "$d")" ] || return 1
    done
}
if [ "$CACHED_ONLY" = 1 ]; then
    if all_cached; then echo "$BIN"; fi
    exit 0
fi

mkdir -p "$CACHE/native"
exec 9>"$CACHE/native/$KEY.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9 || { echo "error: could not lock $CACHE/native/$KEY.lock" >&2; exit 1; }
fi
if all_cached && [ ${#TARGETS[@]} -gt 0 -o ${#DRIVERS[@]} -gt 0 ]; then
    echo "$BIN"
    exit 0
fi

# ---- source tree (extracted and patched once per key) and cmake configure -------------------
start=$(date +%s)
if [ ! -f "$DIR/src/.complete" ]; then
    rm -rf "$DIR/src" "$DIR/src.tmp" "$DIR/build"
    mkdir -p "$DIR"
    sdist_extract_patched "$DIR/src.tmp"
    touch "$DIR/src.tmp/.complete"
    mv "$DIR/src.tmp" "$DIR/src"
    printf '%s\n' "$KEY_TEXT" > "$DIR/key.txt"
fi
LLAMA_SRC="$DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$DIR/build/.configured" ]; then
    log "configuring $KEY"
    rm -rf "$DIR/build"
    cmake -S "$LLAMA_SRC" -B "$DIR/build" "${CMAKE_ARGS[@]}" > "$DIR/configure.log" 2>&1 || {
        tail -n 30 "$DIR/configure.log" >&2; echo "error: cmake configure failed (log: $DIR/configure.log)" >&2; exit 1; }
    touch "$DIR/build/.configured"
fi

# ---- targets ----------------------------------------------------------------------------------
if [ ${#TARGETS[@]} -gt 0 ]; then
    log "building ${TARGETS[*]} for $KEY"
    nice cmake --build "$DIR/build" --parallel "$(nproc 2>/dev/null || echo 2)" --target "${TARGETS[@]}" \
        > "$DIR/build.log" 2>&1 || {
        tail -n 40 "$DIR/build.log" >&2; echo "error: build failed (log: $DIR/build.log)" >&2; exit 1; }
fi

# ---- drivers: our C programs, against the built libraries -----------------------------------
needs_llama() { grep -q '#include "llama.h"' "$1"; }
if [ ${#DRIVERS[@]} -gt 0 ]; then
    # the libraries the drivers link with: ggml, and libllama for a driver that includes llama.h
    LIBS=(ggml ggml-cpu ggml-base)
    for d in "${DRIVERS[@]}"; do if needs_llama "$d"; then LIBS+=(llama); break; fi; done
    nice cmake --build "$DIR/build" --parallel "$(nproc 2>/dev/null || echo 2)" --target "${LIBS[@]}" \
        >> "$DIR/build.log" 2>&1 || {
        tail -n 40 "$DIR/build.log" >&2; echo "error: build failed (log: $DIR/build.log)" >&2; exit 1; }
fi
for d in ${DRIVERS[@]+"${DRIVERS[@]}"}; do
    name="$(driver_name "$d")"
    stamp="$(driver_stamp "$d")"
    if [ -x "$BIN/$name" ] && [ "$(cat "$BIN/$name.stamp" 2>/dev/null)" = "$stamp" ]; then
        continue
    fi
    log "compiling driver $name"
    # shellcheck disable=SC2086
    LLAMA_LIB=()
    if needs_llama "$d"; then LLAMA_LIB=(-lllama); fi
    "$CC" -std=c11 -O2 -Wall -Wextra $ARCH_CFLAGS -I"$LLAMA_SRC/include" -I"$LLAMA_SRC/ggml/include" \
        -o "$BIN/$name.tmp" "$d" -L"$BIN" ${LLAMA_LIB[@]+"${LLAMA_LIB[@]}"} -lggml -lggml-cpu -lggml-base -lm -lpthread \
        -Wl,-rpath,'$ORIGIN' || { echo "error: compiling $d failed" >&2; exit 1; }
    mv "$BIN/$name.tmp" "$BIN/$name"
    echo "$stamp" > "$BIN/$name.stamp"
done
elapsed=$(( $(date +%s) - start ))
[ "$elapsed" -lt 2 ] || log "done in $elapsed s ($KEY)"
echo "$BIN"
