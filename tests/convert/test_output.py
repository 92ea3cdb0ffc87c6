"""The output location: --force replaces only a bundle, leftovers of killed conversions are cleaned, file
system errors (read-only, disk full, file too big, permission) are one line and leave nothing behind, and the
free-space estimate is the bundle's exact size."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dymoe_gguf.bundle import BundleIndex
from dymoe_gguf.cli import cli
from tests.convert.test_bad_input import assert_clean_failure, run_convert

ROOT = Path(__file__).resolve().parents[2]


def one_line_error(res, needle: str) -> str:
    text = res.output.strip()
    assert res.exit_code == 1 and res.exc_info[0] is SystemExit, text
    assert len(text.splitlines()) == 1 and text.startswith("Error: ") and "Traceback" not in text, text
    assert needle.lower() in text.lower(), text
    return text


@pytest.fixture
def src(tmp_path, hf_model) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(hf_model("qwen3moe"), dst)
    return dst


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- what --force may replace


def test_force_refuses_the_source_and_what_holds_it(src, tmp_path, monkeypatch):
    before = snapshot(tmp_path) | {"elsewhere/keep.txt": b"mine"}
    one_line_error(run_convert(src, src, "--force"), "it is the source")
    one_line_error(run_convert(src, tmp_path, "--force"), "holds the source")
    monkeypatch.chdir(src)
    one_line_error(run_convert(".", Path(".."), "--force"), "holds the source")
    one_line_error(run_convert(".", Path("."), "--force"), "is the source")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    monkeypatch.chdir(elsewhere)
    one_line_error(run_convert(src, Path("."), "--force"), "current directory")
    one_line_error(run_convert(src, Path("/"), "--force"), "root directory")
    assert snapshot(tmp_path) == before  # nothing changed, nothing left behind


def test_force_refuses_a_directory_that_is_not_a_bundle(src, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    one_line_error(run_convert(src, out, "--force"), "not a dymoe-gguf bundle (it holds notes.txt)")
    (out / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)  # a bundle's name, not a bundle's content
    (out / "notes.txt").unlink()
    one_line_error(run_convert(src, out, "--force"), "cannot be read as a GGUF")
    plain = tmp_path / "file"
    plain.write_text("x")
    one_line_error(run_convert(src, plain, "--force"), "is a file")
    link = tmp_path / "link"
    link.symlink_to(out)
    one_line_error(run_convert(src, link, "--force"), "symbolic link")
    assert (out / "model.gguf").read_bytes()[:4] == b"GGUF" and plain.read_text() == "x"


def test_a_model_gguf_that_is_not_a_bundle_base_is_not_replaced(src, tmp_path, bundle):
    out = tmp_path / "looks-like"
    out.mkdir()
    shutil.copy(bundle("qwen3moe") / "experts.Q8_0.gguf", out / "model.gguf")  # a sidecar under the base's name
    one_line_error(run_convert(src, out, "--force"), "not the base file")


def test_force_replaces_a_bundle_and_empty_dirs_need_no_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    res = run_convert(src, out, "--tiers", "Q8_0")  # an empty directory: nothing to lose
    assert res.exit_code == 0, res.output
    first = BundleIndex(out).bundle_id
    one_line_error(run_convert(src, out, "--tiers", "Q8_0"), "pass --force")
    (out / "calibration.gguf").write_bytes(b"")  # a bundle's own file names are still a bundle
    res = run_convert(src, out, "--force", "--tiers", "Q2_K")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["experts.Q2_K.gguf", "model.gguf"]
    assert BundleIndex(out).bundle_id != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_synth_force_replaces_only_a_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    res = CliRunner().invoke(cli, ["synth", str(out), "--force", "--layers", "1", "--d-model", "64",
                                   "--expert-ff", "64", "--experts", "2", "--top-k", "1"])
    one_line_error(res, "thesis.tex")
    shutil.rmtree(out)
    args = ["synth", str(out), "--layers", "1", "--d-model", "64", "--expert-ff", "64", "--experts", "2",
            "--top-k", "1"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert CliRunner().invoke(cli, [*args, "--force"]).exit_code == 0
    assert (out / "config.json").is_file()


# --------------------------------------------------------------------------- lock and leftovers


def test_a_second_conversion_into_the_same_output_is_refused(src, tmp_path):
    from dymoe_gguf.convert.output import OutputLock

    out = tmp_path / "out"
    lock = OutputLock(out)
    try:
        one_line_error(run_convert(src, out), f"another conversion into {out} is running (pid {os.getpid()})")
    finally:
        lock.release()
    assert not (tmp_path / ".out.dymoe-lock").exists()
    assert run_convert(src, out, "--tiers", "Q8_0").exit_code == 0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_dead_conversion_are_removed_or_restored(src, tmp_path, bundle, caplog):
    dead = f"pid {_dead_pid()}\nhost {os.uname().nodename}\nstarted 1.000\ndymoe-gguf convert\n"
    # killed while writing: a partial directory and its lock
    (tmp_path / ".a.partial-0123abcd").mkdir()
    (tmp_path / ".a.partial-0123abcd" / "model.gguf").write_bytes(b"half")
    (tmp_path / ".a.dymoe-lock").write_text(dead)
    # killed between the two renames of a --force replacement: the old bundle is moved back
    shutil.copytree(bundle("qwen3moe"), tmp_path / ".b.old-89abcdef")
    (tmp_path / ".b.partial-89abcdef").mkdir()
    (tmp_path / ".b.dymoe-lock").write_text(dead)
    # no lock, or a lock that is not ours: nothing proves it is ours and dead, so it stays
    (tmp_path / ".c.partial-00000000").mkdir()
    (tmp_path / ".d.partial-00000000").mkdir()
    (tmp_path / ".d.dymoe-lock").write_text("someone else's lock\n")
    with caplog.at_level(logging.WARNING, logger="dymoe_gguf"):
        res = run_convert(src, tmp_path / "new", "--tiers", "Q8_0")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.partial-00000000", ".d.dymoe-lock",
                                                           ".d.partial-00000000", "b", "new", "src"]
    assert BundleIndex(tmp_path / "b").bundle_id == BundleIndex(bundle("qwen3moe")).bundle_id
    said = caplog.text
    assert ".a.partial-0123abcd, left by a killed conversion" in said and "restored" in said and ".c." not in said


def test_a_live_conversions_partial_is_left_alone(src, tmp_path):
    from dymoe_gguf.convert.output import OutputLock

    lock = OutputLock(tmp_path / "busy")
    (tmp_path / ".busy.partial-00000000").mkdir()
    try:
        assert run_convert(src, tmp_path / "other", "--tiers", "Q8_0").exit_code == 0
        assert (tmp_path / ".busy.partial-00000000").is_dir()
    finally:
        lock.release()


# --------------------------------------------------------------------------- file system errors


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_mount_ns = pytest.mark.skipif(sys.platform != "linux" or not _can_unshare(),
                                    reason="needs user and mount namespaces (unshare -rm) to mount a small tmpfs")


def in_tmpfs(tmp_path: Path, script: str, size: str = "64m") -> tuple[str, list[str]]:
    """Run ``script`` (sh) in private user+mount namespaces with a tmpfs at $T; return its output and what
    $T holds afterwards. ``$CONVERT`` runs this package's CLI."""
    import tempfile

    mnt = Path(tempfile.mkdtemp(prefix="mnt-", dir=tmp_path))
    env = dict(os.environ, T=str(mnt), CONVERT=f"{sys.executable} -m dymoe_gguf convert",
               PYTHONPATH=str(ROOT))
    full = f'mount -t tmpfs -o size={size} tmpfs "$T" || exit 99\n{script}\necho "left: $(ls -A "$T" | tr "\\n" " ")"'
    res = subprocess.run(["unshare", "-rm", "sh", "-c", full], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode != 99, res.stderr
    out = res.stdout + res.stderr
    left = next(line for line in out.splitlines() if line.startswith("left:")).split()[1:]
    return out, left


def _error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("Error:") or "Traceback" in line]


@needs_mount_ns
def test_read_only_file_system(src, tmp_path):
    out, left = in_tmpfs(tmp_path, f'mount -o remount,ro "$T"; $CONVERT {src} -o "$T/out" -q; echo rc=$?')
    assert "rc=1" in out and _error_lines(out) == [next(x for x in out.splitlines() if x.startswith("Error:"))]
    assert "read-only" in out and "Traceback" not in out and left == []


@needs_mount_ns
def test_honest_free_space_check(src, tmp_path):
    from dymoe_gguf.bundle.format import DEFAULT_BASE_TIER, DEFAULT_TIERS
    from dymoe_gguf.convert import convert

    need = convert(src, tmp_path / "plan", base_tier=DEFAULT_BASE_TIER, tiers=DEFAULT_TIERS, dry_run=True).plan
    assert need.file_sizes is not None
    total = need.total_bytes
    # a tmpfs one 16 KiB page short of the bundle is refused up front, with the exact size
    out, left = in_tmpfs(tmp_path, f'$CONVERT {src} -o "$T/out" -q; echo rc=$?', size=str(total - 16384))
    assert "rc=1" in out and "Not enough disk" in out and left == [], out
    # the bundle's exact size plus one page for the lock file is enough
    out, left = in_tmpfs(tmp_path, f'$CONVERT {src} -o "$T/out" -q; echo rc=$?; cat "$T"/out/* | wc -c',
                         size=str(total + 4096))
    assert "rc=0" in out and left == ["out"], out
    assert str(total) in out.split()


@needs_mount_ns
@pytest.mark.slow
def test_disk_full_while_writing(tmp_path, hf_model):
    src = hf_model("qwen3moe", n_layer=8, n_expert=32, d=512, ff=512, seed=3)  # seconds to convert
    script = f'''$CONVERT {src} -o "$T/out" -q -t 1 > "{tmp_path}/log" 2>&1 &
pid=$!
while ! ls "$T"/.out.partial-*/experts.Q8_0.gguf >/dev/null 2>&1; do sleep 0.01; done
sleep 0.3
used=$(df -B1 --output=used "$T" | tail -1)
for try in 1 2 3 4 5; do mount -o remount,size=$((used + 65536)) "$T" && break; sleep 0.05; done
wait $pid; echo rc=$?; cat "{tmp_path}/log"'''
    out, left = in_tmpfs(tmp_path, script, size="512m")
    assert "rc=1" in out, out
    errors = _error_lines(out)
    assert len(errors) == 1 and "the disk is full" in errors[0] and "nothing was written" in errors[0], out
    assert left == [], out  # no partial directory, no lock file


def test_file_too_large_for_the_system(src, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes (EFBIG): the same one-line path as a full disk."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (300000, 300000)); "
            "from dymoe_gguf.cli import main; sys.argv = ['dymoe-gguf'] + sys.argv[1:]; main()")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", code, "convert", str(src), "-o", str(out), "-q"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    text = (res.stdout + res.stderr).strip()
    assert res.returncode == 1 and len(text.splitlines()) == 1 and "larger than this system allows" in text, text
    assert not out.exists() and not list(tmp_path.glob(".out.*")), text


def _nobody(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    pre = [] if os.geteuid() != 0 else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return subprocess.run([*pre, *cmd], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=dict(os.environ, DYMOE_INDEX_CACHE="", PYTHONPATH=str(ROOT)))


needs_unprivileged = pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                                        reason="running as root without setpriv: permissions are not enforced")


@needs_unprivileged
def test_permission_errors_say_permission(tmp_path, bundle, hf_model):
    import tempfile

    world = Path(tempfile.mkdtemp(prefix="dymoe-perm-"))
    try:
        os.chmod(world, 0o755)
        b = world / "b"
        shutil.copytree(bundle("qwen3moe"), b)
        os.chmod(b / "experts.Q4_K.gguf", 0)
        s = world / "src"
        shutil.copytree(hf_model("qwen3moe"), s)
        os.chmod(s / "model.safetensors", 0)
        for p in (world, b, s, *b.iterdir(), *s.iterdir()):
            if p.name not in ("experts.Q4_K.gguf", "model.safetensors"):
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
        cli_ = [sys.executable, "-m", "dymoe_gguf"]
        res = _nobody([*cli_, "inspect", str(b)], world)
        assert res.returncode == 1 and "Cannot read" in res.stderr and "permission denied" in res.stderr, res.stderr
        assert "Corrupt" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        res = _nobody([*cli_, "convert", str(s), "-o", str(world / "o"), "-q"], world)
        assert res.returncode == 1 and "permission denied" in res.stderr.lower(), res.stderr
        assert "Corrupt" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        os.chmod(s / "model.safetensors", 0o644)
        os.chmod(world, 0o555)  # the output's parent is not writable
        res = _nobody([*cli_, "convert", str(s), "-o", str(world / "o2"), "-q"], world)
        assert res.returncode == 1 and "permission denied" in res.stderr.lower(), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    finally:
        os.chmod(world, 0o755)
        shutil.rmtree(world, ignore_errors=True)


def test_missing_parent_and_clean_failure_helpers_agree(src, tmp_path):
    assert_clean_failure(run_convert(src, tmp_path / "no" / "out"), tmp_path / "no" / "out", "does not exist")
