"""Bundles users can trust: every file checked by inspect, corruption found by --verify, the index cache keyed
on what a rewrite changes, and inspect's model and memory summary checked against llama.cpp."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from dymoe_gguf.bundle import BundleIndex, Tier, memory
from dymoe_gguf.bundle.format import CALIBRATION_FILE, FORMAT_VERSION, Key, is_expert_tensor
from dymoe_gguf.cli import cli
from dymoe_gguf.convert import convert
from dymoe_gguf.errors import BundleError
from tests.convert.test_output import one_line_error


@pytest.fixture
def b(tmp_path, bundle) -> Path:
    """A private copy of a converted bundle (Q4_K base), for each test to break."""
    dst = tmp_path / "b"
    shutil.copytree(bundle("qwen3moe", base_tier=Tier.Q4_K), dst)
    return dst


def inspect(path: Path, *extra: str):
    return CliRunner().invoke(cli, ["inspect", str(path), *extra])


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


# --------------------------------------------------------------------------- checksums


def test_verify_names_the_first_corrupt_tensor(b):
    res = inspect(b, "--verify")
    assert res.exit_code == 0 and "every checksum matches" in res.output, res.output
    s = BundleIndex(b, use_cache=False).slice(1, "up", 5, Tier.Q4_K)
    flip(s.file, s.offset + s.nbytes // 2)
    assert inspect(b).exit_code == 0  # plain inspect reads headers only
    one_line_error(inspect(b, "--verify"), "experts.Q4_K.gguf is corrupt: tensor blk.1.ffn_up_exps.5 (layer 1, up "
                                           "matrix, expert 5) differs from the checksum")
    base = BundleIndex(b, use_cache=False).base_tensors["blk.0.attn_v.weight"]
    flip(b / "model.gguf", base.offset + 3)
    one_line_error(inspect(b, "--verify", "--json"), "model.gguf is corrupt: tensor blk.0.attn_v.weight differs")


def test_checksums_are_xxh3_of_each_tensor(b):
    import xxhash

    idx = BundleIndex(b, use_cache=False)
    for path, tensors in idx.file_tensors().items():
        sums = gguf.GGUFReader(path).get_field(Key.CHECKSUMS).contents()
        assert len(sums) == len(tensors) and idx.checksum_algo == "xxh3_64"
        for (_name, offset, nbytes), want in zip(tensors, sums):
            data = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset)
            assert xxhash.xxh3_64_intdigest(data.tobytes()) == want


def test_bundle_without_checksums_cannot_be_verified(b):
    """A bundle written before checksums existed still opens; --verify says why it cannot check it."""
    from dymoe_gguf.bundle.header import read_header

    for path in b.glob("*.gguf"):
        head = read_header(path, {Key.CHECKSUM_ALGO})
        with open(path, "r+b") as f:  # rename the key in place (same length): as if it never existed
            f.seek(head.value_offsets[Key.CHECKSUM_ALGO] - 4 - len(Key.CHECKSUM_ALGO))
            f.write(b"dymoe.checksum.xxxx")
    assert inspect(b).exit_code == 0 and "converted by an older version" in inspect(b).output
    one_line_error(inspect(b, "--verify"), "holds no checksums")


# --------------------------------------------------------------------------- the index cache


def test_cache_rejects_a_sidecar_rewritten_in_place_with_its_mtime_restored(tmp_path, hf_model, bundle):
    other = bundle("qwen3moe", base_tier=Tier.Q4_K)  # same source, same sizes, another conversion
    b = tmp_path / "b"
    convert(hf_model("qwen3moe"), b, base_tier=Tier.Q4_K, tiers=(Tier.Q2_K, Tier.Q4_K, Tier.Q8_0), threads=2)
    BundleIndex(b)  # cached
    side = b / "experts.Q2_K.gguf"
    st = side.stat()
    data = (other / side.name).read_bytes()
    assert len(data) == st.st_size
    with open(side, "r+b") as f:  # same inode, same size
        f.write(data)
    os.utime(side, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert side.stat().st_mtime_ns == st.st_mtime_ns and side.stat().st_ino == st.st_ino
    with pytest.raises(BundleError, match="another conversion"):
        BundleIndex(b)


def test_cache_is_reused_when_nothing_changed(b, monkeypatch):
    first = BundleIndex(b)
    calls = []
    monkeypatch.setattr(BundleIndex, "_build", lambda self, root: calls.append(root))
    again = BundleIndex(b)
    assert calls == [] and again.to_dict() == first.to_dict()


# --------------------------------------------------------------------------- every file, broken every way

def _foreign(b: Path, bundle) -> None:
    shutil.copy(bundle("qwen3moe", base_tier=Tier.F32) / "experts.Q8_0.gguf", b / "experts.Q8_0.gguf")


def _swap(b: Path, bundle) -> None:
    (b / "experts.Q2_K.gguf").rename(b / "tmp")
    (b / "experts.Q8_0.gguf").rename(b / "experts.Q2_K.gguf")
    (b / "tmp").rename(b / "experts.Q8_0.gguf")


def _truncate(name: str, keep: int):
    def do(b: Path, bundle) -> None:
        p = b / name
        data = p.read_bytes()
        p.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    return do


def _as_dir(name: str):
    def do(b: Path, bundle) -> None:
        (b / name).unlink()
        (b / name).mkdir()
    return do


CASES = {
    "base truncated in its header": (_truncate("model.gguf", 3000), "Corrupt or truncated model.gguf"),
    "base truncated in its data": (_truncate("model.gguf", -20000), "model.gguf is truncated"),
    "base empty": (_truncate("model.gguf", 0), "Corrupt or truncated model.gguf"),
    "base is a directory": (_as_dir("model.gguf"), "model.gguf is not a file"),
    "base missing": (lambda b, bundle: (b / "model.gguf").unlink(), "model.gguf is missing"),
    "base replaced by a sidecar": (lambda b, bundle: shutil.copy(b / "experts.Q4_K.gguf", b / "model.gguf"),
                                   "not a bundle's base file"),
    "base from another conversion": (lambda b, bundle: shutil.copy(bundle("qwen3moe", base_tier=Tier.F32)
                                                                   / "model.gguf", b / "model.gguf"),
                                     "another conversion"),
    "plain GGUF as base": (lambda b, bundle: _plain_gguf(b / "model.gguf"), "not a dymoe-gguf bundle file"),
    "sidecar truncated in its header": (_truncate("experts.Q2_K.gguf", 500), "Corrupt or truncated experts.Q2_K"),
    "sidecar truncated in its data": (_truncate("experts.Q8_0.gguf", -30000), "experts.Q8_0.gguf is truncated"),
    "sidecar missing": (lambda b, bundle: (b / "experts.Q4_K.gguf").unlink(), "experts.Q4_K.gguf is missing"),
    "sidecar is a directory": (_as_dir("experts.Q4_K.gguf"), "experts.Q4_K.gguf is not a file"),
    "sidecars swapped": (_swap, "does not hold tier"),
    "sidecar from another conversion": (_foreign, "another conversion"),
    "calibration garbage": (lambda b, bundle: (b / CALIBRATION_FILE).write_bytes(os.urandom(5000)),
                            "Corrupt or truncated calibration.gguf"),
    "calibration empty": (lambda b, bundle: (b / CALIBRATION_FILE).write_bytes(b""), "calibration.gguf"),
    "calibration is a sidecar": (lambda b, bundle: shutil.copy(b / "experts.Q2_K.gguf", b / CALIBRATION_FILE),
                                 "not a calibration profile"),
    "calibration of other shape": (lambda b, bundle: _profile(b, n_expert=4), "expected shape [2, 8]"),
    "calibration with NaN": (lambda b, bundle: _profile(b, nan=True), "non-finite"),
    "calibration of another bundle": (lambda b, bundle: _profile(b, bundle_id="0" * 32), "another conversion"),
}


def _plain_gguf(path: Path) -> None:
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _profile(b: Path, n_expert: int = 8, nan: bool = False, bundle_id: str | None = None) -> None:
    idx = BundleIndex(b, use_cache=False)
    w = gguf.GGUFWriter(b / CALIBRATION_FILE, idx.arch)
    w.add_uint32(Key.FORMAT_VERSION, FORMAT_VERSION)
    w.add_string(Key.ROLE, "calibration")
    w.add_string(Key.BUNDLE_ID, bundle_id or idx.bundle_id)
    freq = np.full((idx.n_layer, n_expert), 0.25, np.float32)
    if nan:
        freq[0, 0] = np.nan
    w.add_tensor("freq", freq)
    w.add_tensor("mass", np.full((idx.n_layer, n_expert), 0.1, np.float32))
    w.add_tensor("transition", np.full(idx.n_layer, 0.5, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", list(CASES))
def test_broken_bundle_file_is_one_line(case, b, bundle):
    break_it, needle = CASES[case]
    break_it(b, bundle)
    one_line_error(inspect(b), needle)


@pytest.mark.parametrize("case", ["calibration of other shape", "sidecar truncated in its data",
                                  "base from another conversion"])
def test_run_on_a_broken_bundle_is_one_line(case, b, bundle):
    BundleIndex(b)  # a valid index in the cache first: the broken file must not be accepted from it
    break_it, needle = CASES[case]
    break_it(b, bundle)
    one_line_error(CliRunner().invoke(cli, ["run", str(b), "-p", "Hello", "-n", "2"]), needle)


def test_valid_calibration_is_reported(b):
    _profile(b)
    data = json.loads(inspect(b, "--json").output)
    assert data["calibration"]["file"] == CALIBRATION_FILE
    assert "calibration present" in inspect(b).output


def test_bundle_path_errors_do_not_mislead(tmp_path, b):
    (tmp_path / "notes.txt").write_text("x")
    one_line_error(inspect(tmp_path / "notes.txt"), "is a file, not a bundle directory")
    one_line_error(inspect(tmp_path / "nope"), "does not exist")
    one_line_error(inspect(tmp_path), "model.gguf is missing")


# --------------------------------------------------------------------------- what inspect says about the model


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral", "olmoe"])
def test_kv_cache_estimate_matches_llama_cpp(arch, bundle, capfd):
    from dymoe_gguf._native.llama import open_llama

    idx = BundleIndex(bundle(arch, base_tier=Tier.Q4_K))
    for n_ctx in (100, 512):
        capfd.readouterr()
        llm = open_llama(idx.base_path, n_ctx=n_ctx, n_threads=1, verbose=True)
        llm.close()
        log = capfd.readouterr().err
        mib = float(re.search(r"KV buffer size\s*=\s*([0-9.]+) MiB", log).group(1))
        assert abs(memory.kv_cache_bytes(idx, n_ctx) / 2**20 - mib) < 0.006, (arch, n_ctx, mib)


def test_inspect_shows_model_memory_and_presence(bundle, tmp_path, hf_model):
    src = tmp_path / "src"
    shutil.copytree(hf_model("qwen3moe"), src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    convert(src, tmp_path / "b", base_tier=Tier.Q4_K, tiers=(Tier.Q2_K, Tier.Q8_0), threads=2)
    data = json.loads(inspect(tmp_path / "b", "--json").output)
    assert data["top_k"] == 2 and data["context_length"] == 2048 and data["chat_template"] is True
    assert data["calibration"] is None and data["checksums"] == "xxh3_64"
    idx = BundleIndex(tmp_path / "b")
    r = gguf.GGUFReader(idx.base_path)
    assert r.get_field("tokenizer.chat_template").contents() == cfg["chat_template"]
    dense = sum(int(t.n_bytes) for t in r.tensors if not is_expert_tensor(t.name))
    experts = sum(int(t.n_bytes) for t in r.tensors if is_expert_tensor(t.name))
    q2 = idx.expert_bytes()[:, :, 0]
    mem = data["memory"]
    assert mem["dense_bytes"] == dense and mem["all_experts_base_bytes"] == experts
    assert mem["working_set_bytes"] == q2.sum(axis=1).max()  # 512 tokens x top-2 reach every one of 8 experts
    assert memory.working_set_bytes(idx, n_batch=1) == np.sort(q2, axis=1)[:, -2:].sum(axis=1).max()
    assert mem["minimum_bytes"] == dense + mem["kv_bytes"] + mem["working_set_bytes"]
    assert mem["comfortable_bytes"] == dense + mem["kv_bytes"] + experts
    text = inspect(tmp_path / "b").output
    assert "top-2" in text and "context 2048" in text and "template present" in text and "minimum RAM" in text
    assert "calibration absent" in text
    assert "template absent" in inspect(bundle("qwen3moe", base_tier=Tier.Q4_K)).output
