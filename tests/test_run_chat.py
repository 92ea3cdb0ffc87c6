"""``run`` and ``chat`` as llama-cli users expect them, on the shipped model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from dymoe_gguf.cli import cli
from dymoe_gguf.errors import RuntimeConfigError
from dymoe_gguf.runtime.session import Sampling, Session
from tests.serve._helpers import with_chat_template

PROMPT = "The history of"


@pytest.fixture(scope="module")
def chat_bundle(shipped_bundle, tmp_path_factory):
    return with_chat_template(shipped_bundle, tmp_path_factory.mktemp("chat") / "chat.dymoe")


@pytest.fixture(scope="module")
def session(shipped_bundle):
    # one tier for every expert: greedy output does not depend on what the controller learned so far
    with Session.open(shipped_bundle, policy="uniform:Q4_K") as s:
        yield s


def _text(s: Session, sampling: Sampling, n: int = 24) -> str:
    return "".join(s.complete(PROMPT, max_tokens=n, sampling=sampling))


def test_complete_streams_and_times(session):
    assert session.n_ctx == session.n_ctx_train == 512  # 0 = the model's training context
    t0 = session.timings.requests
    seen = []
    for piece in session.complete(PROMPT, max_tokens=12):
        seen.append((piece, session.llm.n_tokens))  # the context grows while the pieces come
    assert len({n for _p, n in seen}) > 5
    t = session.timings
    assert t.requests == t0 + 1 and t.generated_tokens >= 12


def test_sampling_flags_reach_the_sampler(session):
    greedy = _text(session, Sampling())
    assert greedy == _text(session, Sampling())
    hot = Sampling(temperature=5.0, seed=1)
    assert _text(session, hot) == _text(session, hot)  # a seed makes sampling reproducible
    assert _text(session, hot) != greedy
    assert _text(session, Sampling(temperature=5.0, seed=2)) != _text(session, hot)
    # each of these alone leaves one candidate: greedy again, however hot
    for narrow in (Sampling(temperature=5.0, seed=1, top_k=1), Sampling(temperature=5.0, seed=1, min_p=1.0),
                   Sampling(temperature=5.0, seed=1, top_p=0.0, top_k=0, min_p=0.0)):
        assert _text(session, narrow) == greedy, narrow
    assert _text(session, Sampling(repeat_penalty=1.5), n=48) != _text(session, Sampling(), n=48)


def test_prompt_longer_than_the_context_is_one_clear_error(session, shipped_bundle, tmp_path):
    with pytest.raises(RuntimeConfigError, match="context holds 512"):
        session.complete("word " * 600)  # refused when asked, not when the first text is read
    long = tmp_path / "long.txt"
    long.write_text("word " * 600)
    res = CliRunner().invoke(cli, ["run", str(shipped_bundle), "-f", str(long)])
    assert res.exit_code == 1 and "Traceback" not in res.output and res.stdout == ""  # no prompt echoed first
    assert res.output.strip().count("\n") == 0 and "-c/--ctx" in res.output


def test_run_flags_like_llama_cli(shipped_bundle, tmp_path):
    r = CliRunner()
    greedy = json.loads(r.invoke(cli, ["run", str(shipped_bundle), "-p", PROMPT, "-n", "16", "--policy",
                                       "uniform:Q4_K", "--json"]).output)
    assert greedy["n_ctx"] == 512 and greedy["timings"]["generated_tokens"] == 16
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    res = r.invoke(cli, ["run", "-m", str(shipped_bundle), "-f", str(prompt), "-n", "16", "--policy", "uniform:Q4_K",
                         "--temp", "3", "--top-k", "1", "--seed", "5", "-c", "256", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["text"] == greedy["text"] and out["n_ctx"] == 256
    res = r.invoke(cli, ["run", str(shipped_bundle), "-p", PROMPT, "-n", "16", "--policy", "uniform:Q4_K",
                         "--temp", "3", "--seed", "5", "--min-p", "0", "--top-p", "1", "--repeat-penalty", "1.1",
                         "--json"])
    assert json.loads(res.output)["text"] != greedy["text"]


def test_run_prints_text_then_a_summary_on_stderr(shipped_bundle):
    res = CliRunner().invoke(cli, ["run", str(shipped_bundle), "-p", PROMPT, "-n", "8", "--budget", "8MiB"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(PROMPT) and len(res.stdout) > len(PROMPT) + 4 and "{" not in res.stdout
    summary = res.stderr.strip().splitlines()
    assert len(summary) == 1
    for part in ("prompt 4 tokens", "generation 8 tokens", "tok/s", "/ budget 8.0 MiB", "hit rate",
                 "look-ahead recall"):
        assert part in summary[0], summary
    res = CliRunner().invoke(cli, ["run", str(shipped_bundle), "-p", PROMPT, "-n", "4", "--stats", "-q"])
    assert res.exit_code == 0 and "tok/s" not in res.stderr  # -q after the subcommand: no summary
    assert json.loads(res.stderr)["tokens"] >= 4  # --stats: the full stats
    res = CliRunner().invoke(cli, ["run", str(shipped_bundle), "-p", PROMPT, "-n", "4", "--policy", "off"])
    assert res.exit_code == 0 and "policy off" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["-p", "x", "-f", "x.txt"], "not both"),
    ([], "Missing the prompt"),
    (["-f", "/nonexistent/prompt.txt"], "Cannot read the prompt file"),
    (["-m", "/elsewhere/b.dymoe", "-p", "x"], "Two bundles"),
])
def test_run_bad_arguments_are_one_line(shipped_bundle, args, message):
    res = CliRunner().invoke(cli, ["run", str(shipped_bundle), *args])
    assert res.exit_code == 1 and message in res.output and len(res.output.strip().splitlines()) == 1


def test_run_without_a_bundle_is_one_line():
    res = CliRunner().invoke(cli, ["run", "-p", "x"])
    assert res.exit_code == 1 and "Missing the bundle" in res.output


def _dymoe(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dymoe_gguf", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"), **kw)


@pytest.mark.slow
def test_run_streams_tokens_as_they_are_generated(shipped_bundle):
    # 2,000 tokens take seconds: text must appear long before the process ends
    proc = _dymoe("run", str(shipped_bundle), "-p", PROMPT, "-n", "2000", "-c", "4096")
    try:
        got = b""
        deadline = time.time() + 120
        while len(got) < len(PROMPT) + 40 and time.time() < deadline:
            got += os.read(proc.stdout.fileno(), 256)
        assert got.startswith(PROMPT.encode()) and len(got) >= len(PROMPT) + 40
        assert proc.poll() is None, "the text came only at the end"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_verbose_after_the_subcommand_shows_the_runtime_logs(shipped_bundle):
    quiet = _dymoe("run", str(shipped_bundle), "-p", PROMPT, "-n", "2")
    verbose = _dymoe("run", str(shipped_bundle), "-p", PROMPT, "-n", "2", "-v")
    q_err, v_err = quiet.communicate(timeout=300)[1].decode(), verbose.communicate(timeout=300)[1].decode()
    assert quiet.returncode == verbose.returncode == 0
    assert "INFO dymoe_gguf.runtime." in v_err and "INFO" not in q_err


def test_chat_drives_a_conversation_from_stdin(chat_bundle):
    res = CliRunner().invoke(cli, ["chat", str(chat_bundle), "-n", "6", "-s", "Be brief.", "--budget", "8MiB"],
                             input="Tell me a story\nAnd then?\\\nGo on.\n/exit\nnever read\n")
    assert res.exit_code == 0, res.output
    assert len(res.stdout.strip()) > 0 and "never read" not in res.output
    summary = res.stderr.strip().splitlines()[-1]
    assert "generation" in summary and "tok/s" in summary and "budget 8.0 MiB" in summary
    # two replies of at most 6 tokens (the end-of-generation token counts as one)
    assert int(summary.split("generation ")[1].split(" ")[0]) <= 12


def test_chat_keeps_the_history_and_drops_the_oldest_when_full(chat_bundle):
    with Session.open(chat_bundle, policy="uniform:Q4_K", n_ctx=256) as s:
        messages = [{"role": "system", "content": "Be brief."}]
        for i in range(6):
            messages.append({"role": "user", "content": f"Question {i}: " + f"what happened in {1900 + i}? " * 4})
            reply = "".join(s.chat(messages, max_tokens=12))
            messages.append({"role": "assistant", "content": reply})
        # the system message stays, the oldest exchanges went, the last question is there
        assert messages[0]["role"] == "system" and "Question 5" in messages[-2]["content"]
        assert not any("Question 0" in m["content"] for m in messages)
        with pytest.raises(RuntimeConfigError, match="does not fit"):
            list(s.chat([{"role": "user", "content": "word " * 300}]))


def test_chat_needs_a_template_or_a_chat_format(shipped_bundle):
    res = CliRunner().invoke(cli, ["chat", str(shipped_bundle)], input="Hi\n")
    assert res.exit_code == 1 and "--chat-format" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["chat", str(shipped_bundle), "--chat-format", "chatml", "-n", "4"], input="Hi\n")
    assert res.exit_code == 0 and res.stdout.strip(), res.output
    res = CliRunner().invoke(cli, ["chat", str(shipped_bundle), "--chat-format", "nonsense"])
    assert res.exit_code == 1 and "Unknown chat format 'nonsense'" in res.output and "chatml" in res.output


def test_a_context_llama_cpp_rounds_up_is_used_whole(shipped_bundle):
    # llama.cpp pads the context to a multiple of 256; llama-cpp-python sized its token buffer from the
    # unpadded value, so a batch past it crashed (chat) and single tokens past it were silently dropped
    with Session.open(shipped_bundle, policy="uniform:Q4_K", n_ctx=100) as s:
        assert s.n_ctx == 256 and len(s.llm.input_ids) == 256
        text = "".join(s.complete(PROMPT, max_tokens=150))
        assert s.llm.n_tokens > 100 and s.llm.input_ids[100:s.llm.n_tokens].any() and text
