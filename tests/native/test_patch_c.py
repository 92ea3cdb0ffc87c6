"""Tests of the llama.cpp patches (patches/0001 per-expert views, patches/0002 no-populate).

They need numpy, gguf and a *patched* llama_cpp (scripts/build_llama_cpp.sh) in the running python;
on a stock build the module is skipped. A tiny qwen3moe GGUF with random weights is built in a
fixture; experts are stored at Q8_0 and views point at numpy buffers holding single experts
quantized to other types.

The patched-vs-stock comparison uses two cmake builds with the same flags made by
scripts/build_llama_native.sh (bash scripts/test.sh builds them; a plain pytest run skips it if they
are not cached).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

import _ggml_helpers as H  # noqa: E402

from tests.native.builds import cached_build  # noqa: E402

API = H.patch_api()
if API is None:
    pytest.skip("llama_cpp is a stock build (libggml-cpu does not export dymoe_patch_version); "
                "build the patched one with scripts/build_llama_cpp.sh", allow_module_level=True)

N_EMBD = 256
N_FF = 256
N_EXPERT = 8
N_USED = 2
N_VOCAB = 256
N_PROMPT = 48
EXP_NAMES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

# tier of each layer-0 expert in the mixed-view runs (None: no view, the file's Q8_0)
TIERS = {0: H.GGML_TYPE_Q2_K, 1: H.GGML_TYPE_Q3_K, 2: H.GGML_TYPE_Q4_K, 3: H.GGML_TYPE_Q5_K,
         4: H.GGML_TYPE_Q6_K, 5: H.GGML_TYPE_Q8_0, 6: None, 7: H.GGML_TYPE_Q4_K}

RNG = np.random.default_rng(1234)
PROMPT = [int(x) for x in RNG.integers(0, N_VOCAB, N_PROMPT)]
NEXT_TOKEN = 7


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("moe") / "tiny-moe.gguf")
    keep = {}
    H.write_tiny_moe(path, n_layer=2, n_embd=N_EMBD, n_ff_exp=N_FF, n_expert=N_EXPERT,
                     n_expert_used=N_USED, n_vocab=N_VOCAB, seed=0, keep=keep)
    return path, keep


@pytest.fixture(scope="module")
def tier_copies(model_file):
    """Layer-0 expert tensors quantized whole to each tier: {name: {type: uint8[n_expert, rows, rs]}}.

    The Q8_0 tier is quantized from scaled weights so that it differs from the file's Q8_0 data.
    """
    _, keep = model_file
    out = {}
    for n in EXP_NAMES:
        f32 = keep[f"blk.0.{n}.weight"]
        out[n] = {t: H.quantize(t, f32 * (0.75 if t == H.GGML_TYPE_Q8_0 else 1.0))
                  for t in set(x for x in TIERS.values() if x is not None)}
    return out


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["1thread", "2threads", "3threads"])
def runner(request, model_file):
    r = H.Runner(model_file[0], request.param, PROMPT, NEXT_TOKEN, N_VOCAB)
    r.run()  # discovers the weight tensors
    yield r
    API.dymoe_expert_view_clear_all()
    r.close()


@pytest.fixture(autouse=True)
def _clean_views():
    API.dymoe_expert_view_clear_all()
    yield
    API.dymoe_expert_view_clear_all()


def _register_mixed(r: H.Runner, copies, keep_alive: list) -> None:
    for n in EXP_NAMES:
        w = r.weight(f"blk.0.{n}.weight")
        for e, t in TIERS.items():
            if t is None:
                continue
            buf = np.ascontiguousarray(copies[n][t][e])
            keep_alive.append(buf)
            rc = API.dymoe_expert_view_set(w, e, t, buf.ctypes.data, 0)
            assert rc == 0, (n, e, t, rc)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

def test_patch_version():
    from dymoe_gguf._native.hot import HOT_VERSION

    assert API.dymoe_patch_version() == HOT_VERSION  # patches/0003's DYMOE_PATCH_VERSION
    assert API.dymoe_expert_view_count() == 0


def test_setter_validation(runner):
    w = runner.weight("blk.0.ffn_down_exps.weight")
    q = runner.weight("blk.0.attn_q.weight")
    row = H.row_size(H.GGML_TYPE_Q4_K, N_FF)
    buf = np.zeros((N_EMBD, row), dtype=np.uint8)
    p = buf.ctypes.data
    assert API.dymoe_expert_view_set(None, 0, H.GGML_TYPE_Q4_K, p, 0) == -1
    assert API.dymoe_expert_view_set(q, 0, H.GGML_TYPE_Q4_K, p, 0) == -3
    assert API.dymoe_expert_view_set(w, -1, H.GGML_TYPE_Q4_K, p, 0) == -4
    assert API.dymoe_expert_view_set(w, N_EXPERT, H.GGML_TYPE_Q4_K, p, 0) == -4
    assert API.dymoe_expert_view_set(w, 0, 26, p, 0) == -5            # GGML_TYPE_I32: no vec_dot
    assert API.dymoe_expert_view_set(w, 0, 9999, p, 0) == -5
    assert API.dymoe_expert_view_set(w, 0, H.GGML_TYPE_Q4_K, p, row - 1) == -6
    # a repacked tensor (extra != NULL) is refused: a copy of w's struct with extra set
    fake = (ctypes.c_char * 336).from_buffer_copy(ctypes.string_at(w, 336))
    ctypes.c_void_p.from_address(ctypes.addressof(fake) + H.OFF_EXTRA).value = 1
    assert API.dymoe_expert_view_set(ctypes.addressof(fake), 0, H.GGML_TYPE_Q4_K, p, 0) == -2
    assert API.dymoe_expert_view_count() == 0

    assert API.dymoe_expert_view_set(w, 1, H.GGML_TYPE_Q4_K, p, 0) == 0
    assert API.dymoe_expert_view_set(w, 2, H.GGML_TYPE_Q4_K, p, row) == 0
    assert API.dymoe_expert_view_set(w, 2, H.GGML_TYPE_Q4_K, p, 0) == 0   # replace
    assert API.dymoe_expert_view_count() == 1
    assert API.dymoe_expert_view_set(w, 2, H.GGML_TYPE_Q4_K, None, 0) == 0  # drop one
    assert API.dymoe_expert_view_count() == 1
    assert API.dymoe_expert_view_clear(w) == 1
    assert API.dymoe_expert_view_count() == 0
    assert API.dymoe_expert_view_clear(w) == 0
    assert API.dymoe_expert_view_set(w, 3, H.GGML_TYPE_Q4_K, p, 0) == 0
    assert API.dymoe_expert_view_set(w, 3, H.GGML_TYPE_Q4_K, None, 0) == 0  # last view: table gone
    assert API.dymoe_expert_view_count() == 0


def test_nothing_registered_is_unchanged(runner, tier_copies):
    """(a) no views -> the same bits as before any view was registered, and after clearing them."""
    before = runner.run()
    keep = []
    _register_mixed(runner, tier_copies, keep)
    with_views = runner.run()
    API.dymoe_expert_view_clear_all()
    after = runner.run()
    for phase in ("prompt", "decode"):
        for k in ("logits", "ffn_moe_down-0"):
            assert np.array_equal(_bits(before[phase][k]), _bits(after[phase][k])), (phase, k)
        # the views are really used (a second library copy would silently ignore them)
        assert not np.array_equal(before[phase]["logits"], with_views[phase]["logits"]), phase


def test_views_of_file_data_are_bit_identical(runner):
    """Views that point at the file's own bytes (as separate buffers) change nothing."""
    before = runner.run()
    keep = []
    for n in EXP_NAMES:
        w = runner.weight(f"blk.0.{n}.weight")
        ne, nb = H.t_ne(w), H.t_nb(w)
        raw = ctypes.string_at(H.t_data(w), nb[2] * ne[2])
        for e in range(0, N_EXPERT, 2):
            buf = np.frombuffer(raw[e * nb[2]:(e + 1) * nb[2]], dtype=np.uint8).copy()
            keep.append(buf)
            assert API.dymoe_expert_view_set(w, e, H.t_type(w), buf.ctypes.data, nb[1]) == 0
    after = runner.run()
    for phase in ("prompt", "decode"):
        for k in ("logits", "ffn_moe_down-0"):
            assert np.array_equal(_bits(before[phase][k]), _bits(after[phase][k])), (phase, k)


def test_mixed_views_match_whole_layer_swap(runner, tier_copies):
    """(b) each slot of ffn_moe_down-0 with per-expert views (Q2_K..Q8_0 mixed, Q8_0 base) is
    bit-identical to the same slot when the whole layer is swapped to that expert's tier."""
    base = runner.run()
    keep = []
    _register_mixed(runner, tier_copies, keep)
    mixed = runner.run()
    API.dymoe_expert_view_clear_all()

    refs = {None: base}
    swaps = [H.TensorSwap(runner.weight(f"blk.0.{n}.weight")) for n in EXP_NAMES]
    try:
        for t in sorted(set(x for x in TIERS.values() if x is not None)):
            for s, n in zip(swaps, EXP_NAMES):
                s.swap(t, tier_copies[n][t])
            refs[t] = runner.run()
            for s in swaps:
                s.restore()
    finally:
        for s in swaps:
            s.restore()
    # restoring is exact
    again = runner.run()
    assert np.array_equal(_bits(again["prompt"]["logits"]), _bits(base["prompt"]["logits"]))

    seen = set()
    for phase in ("prompt", "decode"):
        ids = mixed[phase]["ffn_moe_topk-0"]       # [n_tokens, n_used]
        out = mixed[phase]["ffn_moe_down-0"]       # [n_tokens, n_used, n_embd]
        assert out.shape == (ids.shape[0], N_USED, N_EMBD)
        for ref in refs.values():
            assert np.array_equal(ref[phase]["ffn_moe_topk-0"], ids), "layer-0 routing must not change"
        for i in range(ids.shape[0]):
            for s in range(N_USED):
                e = int(ids[i, s])
                t = TIERS[e]
                seen.add(t)
                ref = refs[t][phase]["ffn_moe_down-0"][i, s]
                assert np.array_equal(_bits(out[i, s]), _bits(ref)), \
                    f"{phase}: token {i} slot {s} expert {e} tier {H.TYPE_NAMES.get(t, t)}"
    assert len(seen) >= 5, f"too few tiers routed to check: {seen}"


def test_views_set_inside_eval_callback(runner, tier_copies):
    """Views registered in the ask=false callback of ffn_moe_topk-0 apply to that very step."""
    keep = []
    _register_mixed(runner, tier_copies, keep)
    mixed = runner.run()
    API.dymoe_expert_view_clear_all()

    def register(r):
        if API.dymoe_expert_view_count() == 0:
            _register_mixed(r, tier_copies, keep)

    runner.on_topk = register
    try:
        res = runner.run()
    finally:
        runner.on_topk = None
        API.dymoe_expert_view_clear_all()
    for phase in ("prompt", "decode"):
        assert np.array_equal(_bits(res[phase]["ffn_moe_down-0"]), _bits(mixed[phase]["ffn_moe_down-0"]))
        assert np.array_equal(_bits(res[phase]["logits"]), _bits(mixed[phase]["logits"]))


_CHILD_LOGITS = textwrap.dedent(r"""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import _ggml_helpers as H
    prompt, next_token, n_vocab = json.loads(sys.argv[3])
    out = {"logits": {}}
    for n in (1, 2):
        r = H.Runner(sys.argv[1], n, prompt, next_token, n_vocab)
        res = r.run()
        out["logits"][n] = {p: res[p]["logits"].view("uint32").tolist() for p in ("prompt", "decode")}
        r.close()
    out["ggml_cpu"] = H._loaded_path("libggml-cpu")
    out["patched"] = H.patch_api() is not None
    print(json.dumps(out))
""")


def _patched_and_stock_libs(tmp_path) -> tuple[Path, Path]:
    """Library directories of two cmake builds with the same flags (scripts/build_llama_native.sh,
    x86-native): the patched one, and the same libllama with a stock (unpatched) ggml. Patch 0001 is
    all in libggml-cpu; 0002's libllama change is an environment switch, off here."""
    patched = cached_build("x86-native", targets=("llama",))
    stock_ggml = cached_build("x86-native", stock=True, targets=("ggml-cpu", "ggml"))
    stock = tmp_path / "stock-lib"
    stock.mkdir()
    for f in [*patched.glob("libllama.so*"), *stock_ggml.glob("libggml*.so*")]:
        shutil.copy2(f, stock / f.name, follow_symlinks=False)
    return patched, stock


@pytest.mark.skipif(platform.machine() != "x86_64", reason="compares x86-native builds")
@pytest.mark.parametrize("expert_type", [H.GGML_TYPE_Q8_0, H.GGML_TYPE_Q4_K], ids=["Q8_0", "Q4_K"])
def test_nothing_registered_matches_stock(model_file, tmp_path, expert_type):
    """(a) with nothing registered, the patched build gives the bits of a stock build (logits of a
    prompt batch and a decode, 1 and 2 threads), Q8_0 and Q4_K experts."""
    path = model_file[0]
    if expert_type != H.GGML_TYPE_Q8_0:
        path = str(tmp_path / "tiny-moe-q4k.gguf")
        H.write_tiny_moe(path, n_layer=2, n_embd=N_EMBD, n_ff_exp=N_FF, n_expert=N_EXPERT, n_expert_used=N_USED,
                         n_vocab=N_VOCAB, seed=0, expert_type=expert_type)
    patched, stock = _patched_and_stock_libs(tmp_path)
    here = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for label, libdir in (("stock", stock), ("patched", patched)):
        # LD_LIBRARY_PATH: the copied libllama's RUNPATH still names the patched build directory
        env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(libdir), LD_LIBRARY_PATH=str(libdir))
        p = subprocess.run([sys.executable, "-c", _CHILD_LOGITS, path, here,
                            json.dumps([PROMPT, NEXT_TOKEN, N_VOCAB])],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        res = json.loads(p.stdout.strip().splitlines()[-1])
        # the child ran the library we meant: a stock ggml-cpu from the stock directory
        assert Path(res["ggml_cpu"]).resolve().parent == libdir.resolve(), (label, res["ggml_cpu"])
        assert res["patched"] == (label == "patched"), label
        results[label] = res["logits"]
    assert results["stock"] == results["patched"]


_CHILD_IO = textwrap.dedent(r"""
    import ctypes, os, sys
    import llama_cpp

    def read_bytes():
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
        return -1

    _quiet = llama_cpp.llama_log_callback(lambda *a: None)
    llama_cpp.llama_log_set(_quiet, None)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_mmap = True
    mp.use_extra_bufts = False
    before = read_bytes()
    m = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), mp)
    assert m
    after = read_bytes()
    print(after - before)
    llama_cpp.llama_model_free(m)
""")


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/io and posix_fadvise: Linux")
def test_no_populate_cold_start(tmp_path):
    """(c) DYMOE_NO_POPULATE=1: a cold load reads a small fraction of the file (stock: all of it)."""
    path = str(tmp_path / "bigger-moe.gguf")
    H.write_tiny_moe(path, n_layer=2, n_embd=256, n_ff_exp=256, n_expert=128, n_expert_used=2,
                     n_vocab=256, seed=1)
    size = os.path.getsize(path)
    assert size > 40 << 20
    got = {}
    for label, value in (("populate", None), ("no_populate", "1")):
        env = dict(os.environ)
        env.pop("DYMOE_NO_POPULATE", None)
        if value is not None:
            env["DYMOE_NO_POPULATE"] = value
        _drop_cache(path)
        p = subprocess.run([sys.executable, "-c", _CHILD_IO, path], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        got[label] = int(p.stdout.strip().splitlines()[-1])
    if got["populate"] < 0.5 * size:
        pytest.skip(f"cold-start reads are not measurable here (stock load read {got['populate']} "
                    f"of {size} bytes): page cache not dropped or /proc/self/io not counting")
    assert got["no_populate"] < 0.1 * size, (got, size)
