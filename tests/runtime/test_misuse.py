"""Misuse raises a clear Python exception; it never kills the process. Each scenario runs in a child
process, so that a segfault or an abort (what these did before) fails the test instead of the suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dymoe_gguf.bundle import Tier

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def q8(bundle) -> Path:
    return bundle("qwen3moe", base_tier=Tier.Q8_0, n_layer=3)


def _child(body: str, bundle: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    head = "import sys, threading, time\nfrom dymoe_gguf import Controller\nBUNDLE = sys.argv[1]\n"
    code = head + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=timeout)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])


@pytest.mark.parametrize("policy", ["dymoe", "off"])
def test_using_the_llama_after_close_raises(q8, policy):
    res = _child(f"""
        from dymoe_gguf.runtime.guard import ClosedError
        with Controller.open(BUNDLE, policy="{policy}", memory_budget="64MiB") as ctl:
            llm = ctl.llama(n_ctx=64, n_threads=1)
            llm.create_completion("Hello", max_tokens=2)
            last, again = ctl.stats(), ctl.stats()  # a snapshot folds every decoded token in before it reads
            key = lambda x: (x.tokens, x.lookahead_recall, x.callback_seconds)  # noqa: E731
            assert key(last) == key(again), (key(last), key(again))
        for use in (lambda: llm.create_completion("Hi", max_tokens=2), lambda: llm.tokenize(b"x"),
                    lambda: llm.eval([1]), lambda: llm.n_vocab()):
            try:
                use()
                print("NO ERROR")
            except ClosedError as exc:
                assert "closed" in str(exc)
        final = ctl.stats()  # the stats taken at close, no OSError from unmapped memory
        assert ctl.stats() == final and final.tokens == last.tokens  # (the pager's thread ran until close)
        ctl.close()
        llm.close()  # harmless
        print("done")
    """, q8)
    _ok(res)
    assert "NO ERROR" not in res.stdout and "done" in res.stdout


def test_close_while_another_thread_generates_waits_then_raises_there(q8):
    res = _child("""
        from dymoe_gguf.runtime.guard import ClosedError
        ctl = Controller.open(BUNDLE, policy="dymoe", memory_budget="64MiB")
        llm = ctl.llama(n_ctx=512, n_threads=1)
        outcome = []
        def generate():  # token by token: create_completion runs past max_tokens on incomplete UTF-8
            try:
                llm.eval(llm.tokenize(b"Hello"))
                for _ in range(400):
                    llm.eval([llm.sample(temp=0.0)])
                outcome.append("finished")
            except ClosedError:
                outcome.append("closed")
        t = threading.Thread(target=generate)
        t.start()
        time.sleep(1.0)
        ctl.close()
        t.join()
        print(outcome)
    """, q8)
    _ok(res)
    assert "['closed']" in res.stdout or "['finished']" in res.stdout, res.stdout


def test_two_threads_on_one_llama_get_an_error_not_an_abort(q8):
    res = _child("""
        from dymoe_gguf.runtime.guard import ConcurrentUseError
        with Controller.open(BUNDLE, policy="dymoe") as ctl:
            llm = ctl.llama(n_ctx=512, n_threads=1)
            errors = []
            def generate():
                try:
                    for _ in range(30):
                        llm.create_completion("Hello there", max_tokens=8, temperature=0.0)
                except ConcurrentUseError as exc:
                    errors.append(str(exc))
            threads = [threading.Thread(target=generate) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print("errors", len(errors))
            llm.create_completion("Still works", max_tokens=2)
            print("usable")
    """, q8)
    _ok(res)
    assert "usable" in res.stdout and "errors 1" in res.stdout, res.stdout


def test_an_exception_in_the_callback_surfaces_and_the_llama_stays_usable(q8):
    res = _child("""
        from dymoe_gguf.errors import DymoeError
        ctl = Controller.open(BUNDLE, policy="dymoe", lookahead=0)
        calls = []
        def boom(layer, ptr):
            calls.append(layer)
            if len(calls) == 2:
                raise ValueError("planted failure")
        ctl.extra_handlers = {"ffn_norm": boom}
        llm = ctl.llama(n_ctx=128, n_threads=1)
        try:
            llm.eval(llm.tokenize(b"Hello world, hello again"))
            print("NO ERROR")
        except DymoeError as exc:
            assert "planted failure" in str(exc), exc
            print("raised after", len(calls), "layers")
        assert llm.n_tokens == 0  # the failed batch was forgotten
        llm.eval(llm.tokenize(b"Hello"))
        print("usable", llm.n_tokens)
        ctl.close()
    """, q8)
    _ok(res)
    assert "NO ERROR" not in res.stdout and "raised after 2 layers" in res.stdout and "usable" in res.stdout


def test_a_misspelled_option_names_the_right_one(q8):
    from dymoe_gguf import Controller
    from dymoe_gguf.errors import RuntimeConfigError

    with pytest.raises(RuntimeConfigError, match="did you mean 'memory_budget'"):
        Controller.open(q8, budget="4MiB")


def _interrupt(argv: list[str], model: Path, after: float) -> tuple[int, str, float]:
    """Start ``argv``, wait until it has mapped ``model`` (loaded) plus ``after`` seconds, send SIGINT."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while str(model) not in Path(f"/proc/{proc.pid}/maps").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(after)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err, time.monotonic() - t0


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="waits on /proc/PID/maps")


@LINUX
def test_ctrl_c_during_run_exits_130_promptly(q8):
    exe = str(Path(sys.executable).with_name("dymoe-gguf"))
    code, err, took = _interrupt([exe, "run", str(q8), "-p", "Hello", "-n", "2000", "--ctx", "2048"],
                                 q8 / "model.gguf", after=2)
    assert code == 130, (code, err[-2000:])
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert took < 10, took


@LINUX
def test_ctrl_c_during_calibrate_publishes_nothing(q8, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(q8, b)
    text = tmp_path / "t.txt"
    text.write_text((ROOT / "data" / "heldout.txt").read_text() * 3)
    exe = str(Path(sys.executable).with_name("dymoe-gguf"))
    code, err, _ = _interrupt([exe, "calibrate", str(b), "--text", str(text), "--ctx", "64"], b / "model.gguf", after=2)
    assert code == 130, (code, err[-2000:])
    assert not (b / "calibration.gguf").exists() and not list(b.glob(".calibration*"))


@LINUX
def test_ctrl_c_while_the_sampler_calls_python_ends_the_generation(q8):
    """SIGINT handled inside llama-cpp-python's sampler callback (our timing logits processor) must not
    be lost: ctypes swallows an exception raised there, and the generation went on to the end (seen as
    a ``run`` that ignored Ctrl-C). Here the signal is sent from inside that callback."""
    res = _child("""
        import os, signal
        from dymoe_gguf.runtime import session
        call = session.Meter.__call__
        def poke(self, ids, scores):
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return call(self, ids, scores)
        session.Meter.__call__ = poke
        with session.Session.open(BUNDLE, n_ctx=512) as s:
            pieces = 0
            try:
                for _ in s.complete("Hello", max_tokens=300):
                    pieces += 1
                print("NOT INTERRUPTED", s.llm.n_tokens)
            except KeyboardInterrupt:
                print("interrupted at", s.llm.n_tokens)
    """, q8)
    _ok(res)
    assert "interrupted at" in res.stdout, res.stdout + res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) < 20, res.stdout


@LINUX
def test_ctrl_c_while_llama_cpp_loads_the_model_is_not_lost(q8):
    """SIGINT handled inside a ctypes callback that llama.cpp calls while it loads (its log callback)
    raised KeyboardInterrupt there, where ctypes swallows it: the load went on and so did the run (a
    ``run`` that ignored Ctrl-C). The signal is sent from that callback here."""
    res = _child("""
        import ctypes, os, signal
        import llama_cpp
        sent = []
        @llama_cpp.llama_log_callback
        def log(level, text, user_data):
            if not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)
        llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
        for policy in ("dymoe", "off"):
            sent.clear()
            ctl = Controller.open(BUNDLE, policy=policy)
            try:
                ctl.llama(n_ctx=128, n_threads=1)
                print("NOT INTERRUPTED", policy)
            except KeyboardInterrupt:
                print("interrupted", policy, len(sent))
            ctl.close()
    """, q8)
    _ok(res)
    assert "interrupted dymoe 1" in res.stdout and "interrupted off 1" in res.stdout, res.stdout + res.stderr[-2000:]
