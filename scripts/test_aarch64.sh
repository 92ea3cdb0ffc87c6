#!/usr/bin/env bash
# aarch64 verification of the patched llama.cpp, emulated (issue 14): cross-builds, runs under qemu-user,
# compares with x86 builds of the same source. Prints one line per check, a verdict and the time taken.
#
# usage: scripts/test_aarch64.sh [--install] [--quick]
#   --install   apt-get install the cross toolchain and qemu first (gcc/g++-aarch64-linux-gnu,
#               qemu-user-static; needs root and Debian/Ubuntu)
#   --quick     only the Pi 5 build (cortex-a76) and one thread count
#
# Builds (cached by scripts/build_llama_native.sh under ~/.cache/dymoe-gguf/native; cold: see README):
#   aarch64-a76      -mcpu=cortex-a76 (Raspberry Pi 5: NEON, dotprod, fp16)     run: qemu -cpu cortex-a76
#   aarch64-armv8.2  -march=armv8.2-a (generic: NEON, no dotprod, no fp16 arith)  run: qemu -cpu cortex-a76
#   x86-native       -march=native (this CPU; the reference)
#   x86-avx2         AVX2/FMA/F16C, no AVX-512 (shares most kernels with x86-native: reported only)
#   x86-scalar       x86-64 baseline: ggml's generic C kernels everywhere (sets the tolerance)
# Checks:
#   1. tests/native/c/views_test.c: one MoE layer mixing Q2_K/Q4_K/Q8_0 experts through per-expert views
#      is bit-identical to the whole-layer path, prompt and decode batches, 1 and 2 threads, every build;
#   2. tests/native/c/forward.c on the shipped model's bundle (models/tiny-moe converted with defaults):
#      plain, with per-expert views mixing the three tiers, with every expert viewed at the base
#      tier Q4_K, and mixed with patch 0003's C hot path hooked on every MoE layer (--hook: forward.c
#      checks the hook's log, misses and counters itself). Within each build: 1 and 2 threads
#      bit-identical, Q4_K views bit-identical to plain, the hook bit-identical to mixed. Across
#      builds: each aarch64 build against x86-native within twice the difference measured here
#      between x86-native and x86-scalar (max |dlogit| and max KL; tests/native/fwd_compare.py
#      --verdict); the same against x86-avx2 is printed as information (it is bit-identical to
#      x86-native at most positions, so it measures one or two kernels, not a change of SIMD code);
#   3. the same runs under qemu's -p 16384 (the guest sees 16 KiB pages): bit-identical to 4 KiB.
# Needs the project's .venv (scripts/setup.sh) for convert and the comparison.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)

INSTALL=0
QUICK=0
for a in "$@"; do
    case "$a" in
        --install) INSTALL=1 ;;
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $a" >&2; exit 2 ;;
    esac
done

if [ "$INSTALL" = 1 ] && { ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 ||
                            ! command -v qemu-aarch64-static >/dev/null 2>&1; }; then
    echo "test_aarch64: installing the cross toolchain and qemu (apt-get)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu g++-aarch64-linux-gnu \
        qemu-user-static >&2
fi
QEMU_BIN="$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)"
for t in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++; do
    command -v "$t" >/dev/null 2>&1 || { echo "error: $t not found (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu, or --install)" >&2; exit 2; }
done
[ -n "$QEMU_BIN" ] || { echo "error: qemu-aarch64 not found (apt-get install qemu-user-static, or --install)" >&2; exit 2; }
[ -x .venv/bin/python ] || { echo "error: .venv missing: run bash scripts/setup.sh first" >&2; exit 2; }
PY=.venv/bin/python
SYSROOT=/usr/aarch64-linux-gnu
OUT="build/aarch64"
rm -rf "$OUT"
mkdir -p "$OUT"

# ---- builds ----------------------------------------------------------------------------------
B="scripts/build_llama_native.sh"
V=tests/native/c/views_test.c
F=tests/native/c/forward.c
t0=$(date +%s)
X86N="$(bash "$B" --variant x86-native --driver "$V" --driver "$F" | tail -n1)"
X86A="$(bash "$B" --variant x86-avx2 --driver "$F" | tail -n1)"
X86S="$(bash "$B" --variant x86-scalar --driver "$F" | tail -n1)"
A76="$(bash "$B" --variant aarch64-a76 --driver "$V" --driver "$F" | tail -n1)"
ARM_BUILDS="a76"
if [ "$QUICK" = 0 ]; then
    A82="$(bash "$B" --variant aarch64-armv8.2 --driver "$V" --driver "$F" | tail -n1)"
    ARM_BUILDS="a76 armv8.2"
fi
echo "test_aarch64: builds ready in $(( $(date +%s) - t0 )) s"
arm_dir() { if [ "$1" = a76 ]; then echo "$A76"; else echo "$A82"; fi; }

qemu() {  # qemu [-p PAGESIZE] BIN ARGS...
    local page=()
    if [ "$1" = -p ]; then page=(-p "$2"); shift 2; fi
    "$QEMU_BIN" -L "$SYSROOT" -cpu cortex-a76 ${page[@]+"${page[@]}"} "$@"
}

FAILS=0
check() {  # check NAME CMD...: run, print PASS/FAIL with the command's last line
    local name="$1"; shift
    local log="$OUT/$(echo "$name" | tr ' /' '__').log"
    if "$@" > "$log" 2>&1; then
        echo "PASS  $name: $(tail -n1 "$log")"
    else
        echo "FAIL  $name (log $log):"; tail -n 8 "$log" | sed 's/^/      /'
        FAILS=$((FAILS + 1))
    fi
}

# ---- 1. per-expert views, C test against ggml -------------------------------------------------
THREADS="1 2"
[ "$QUICK" = 0 ] || THREADS="2"
check "views x86-native" "$X86N/views_test" $THREADS
for a in $ARM_BUILDS; do
    check "views aarch64-$a (qemu)" qemu "$(arm_dir "$a")/views_test" $THREADS
done
check "views aarch64-a76 (qemu -p 16384)" qemu -p 16384 "$A76/views_test" $THREADS

# ---- 2. forward passes of the shipped model's bundle -------------------------------------------
"$PY" -m dymoe_gguf convert models/tiny-moe -o "$OUT/tiny.dymoe" -q > "$OUT/convert.log" 2>&1 || {
    cat "$OUT/convert.log" >&2; echo "error: convert failed" >&2; exit 1; }
MODEL="$OUT/tiny.dymoe/model.gguf"
TEXT="$OUT/text.txt"
head -c 4096 data/heldout.txt > "$TEXT"   # 128 + 4 tokens need far less; tokenizing under qemu is slow
N=128
fwd() {  # fwd LABEL RUNNER...: forward.c for the four modes
    local label="$1"; shift
    local runner=("$@")
    "${runner[@]}" "$MODEL" "$TEXT" "$N" "$T" "$OUT/$label.plain.bin" &&
    "${runner[@]}" "$MODEL" "$TEXT" "$N" "$T" "$OUT/$label.mixed.bin" "$OUT/tiny.dymoe" &&
    "${runner[@]}" "$MODEL" "$TEXT" "$N" "$T" "$OUT/$label.q4k.bin" "$OUT/tiny.dymoe" Q4_K &&
    "${runner[@]}" --hook "$MODEL" "$TEXT" "$N" "$T" "$OUT/$label.hook.bin" "$OUT/tiny.dymoe"
}
for T in $THREADS; do
    check "forward x86-native t$T" fwd "x86-native.t$T" "$X86N/forward"
    check "forward x86-avx2 t$T" fwd "x86-avx2.t$T" "$X86A/forward"
    check "forward x86-scalar t$T" fwd "x86-scalar.t$T" "$X86S/forward"
    for a in $ARM_BUILDS; do
        check "forward aarch64-$a t$T (qemu)" fwd "aarch64-$a.t$T" qemu "$(arm_dir "$a")/forward"
    done
done
T=2
check "forward aarch64-a76 t$T (qemu -p 16384)" fwd "aarch64-a76-p16k.t$T" qemu -p 16384 "$A76/forward"

# ---- verdict on the logits ------------------------------------------------------------------------
echo "---- logits (tests/native/fwd_compare.py --verdict $OUT)"
ARM_LABELS="$(for a in $ARM_BUILDS; do printf 'aarch64-%s ' "$a"; done)"
if ! "$PY" tests/native/fwd_compare.py --verdict "$OUT" --builds "x86-native x86-avx2 x86-scalar $ARM_LABELS" \
        --threads "$THREADS" --page16k aarch64-a76-p16k.t2 --tolerance-from x86-scalar; then
    FAILS=$((FAILS + 1))
fi
ELAPSED=$(( $(date +%s) - START ))
if [ "$FAILS" = 0 ]; then
    echo "test_aarch64: PASS ($ELAPSED s; qemu $("$QEMU_BIN" -version | head -n1 | awk '{print $3}'))"
else
    echo "test_aarch64: FAIL: $FAILS check(s) failed ($ELAPSED s)"
    exit 1
fi
