# The pinned llama-cpp-python sdist and our patches: shared by build_llama_cpp.sh (the Python wheel)
# and build_llama_native.sh (cmake builds of the vendored llama.cpp). Sourced, not run.
#
# Before sourcing, set PY (a python with pip) and ROOT (the project root). Defines:
#   VERSION, PKG, CACHE, SDIST_DIR, PATCH_DIR
#   sha256_of FILE              print FILE's sha256
#   sdist_fetch                 set SDIST (fetched once into $CACHE/sdist with pip download)
#   patch_list STOCK            set PATCHES (every patches/*.patch in name order; empty if STOCK=1)
#   sdist_key_lines             print the cache-key lines for SDIST and PATCHES
#   sdist_extract_patched DEST  extract SDIST under DEST, apply PATCHES; set SRC (the sdist root)

VERSION=0.3.36
PKG=llama-cpp-python
PATCH_DIR="$ROOT/patches"
CACHE="${DYMOE_CACHE:-$HOME/.cache/dymoe-gguf}"
SDIST_DIR="$CACHE/sdist"

sha256_of() {
    "$PY" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
}

sdist_fetch() {
    mkdir -p "$SDIST_DIR"
    SDIST="$(ls "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null | head -n1 || true)"
    if [ -z "$SDIST" ]; then
        echo "$(basename "$0"): fetching $PKG==$VERSION sdist" >&2
        "$PY" -m pip download --quiet --no-deps --no-binary :all: "$PKG==$VERSION" -d "$SDIST_DIR" >&2
        SDIST="$(ls "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null | head -n1 || true)"
        [ -n "$SDIST" ] || { echo "error: could not download the $PKG $VERSION sdist" >&2; exit 1; }
    fi
}

patch_list() {
    PATCHES=()
    if [ "$1" = 0 ]; then
        shopt -s nullglob
        PATCHES=("$PATCH_DIR"/*.patch)
        shopt -u nullglob
        [ ${#PATCHES[@]} -gt 0 ] || { echo "error: no patches in $PATCH_DIR" >&2; exit 1; }
    fi
}

sdist_key_lines() {
    echo "sdist $(sha256_of "$SDIST")"
    echo "stock $([ ${#PATCHES[@]} -eq 0 ] && echo 1 || echo 0)"
    local p
    for p in ${PATCHES[@]+"${PATCHES[@]}"}; do
        echo "patch $(basename "$p") $(sha256_of "$p")"
    done
}

sdist_extract_patched() {
    local dest="$1" p name
    mkdir -p "$dest"
    tar -xzf "$SDIST" -C "$dest"
    SRC="$dest/llama_cpp_python-$VERSION"
    [ -d "$SRC" ] || { echo "error: unexpected sdist layout in $SDIST" >&2; exit 1; }
    for p in ${PATCHES[@]+"${PATCHES[@]}"}; do
        name="$(basename "$p")"
        if ! patch -d "$SRC" -p1 --forward --dry-run --silent < "$p" >/dev/null 2>&1; then
            echo "error: patch $name no longer applies to llama-cpp-python $VERSION" >&2
            exit 1
        fi
        patch -d "$SRC" -p1 --forward --silent < "$p" >&2
        echo "$(basename "$0"): applied $name" >&2
    done
}
