"""``dymoe-gguf serve``: every route over real HTTP, on the shipped model, in a subprocess."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serve._helpers import Server

pytestmark = pytest.mark.slow
BUDGET = 8 * 2**20
CTX = 4096  # more than the model's 512, so a stream can outlast a shutdown
PROMPT = "The history of"


@pytest.fixture(scope="module")
def server(shipped_bundle, tmp_path_factory):
    s = Server(shipped_bundle, tmp_path_factory.mktemp("serve") / "server.log", "--budget", "8MiB", "-c", str(CTX),
               "-v")
    yield s
    s.stop(signal.SIGKILL)


def _ok(server: Server) -> None:
    status, body = server.json("/health")
    assert status == 200 and body["status"] == "ok", body


def test_health_and_models(server, shipped_bundle):
    _ok(server)
    status, body = server.json("/v1/models")
    assert status == 200
    assert [m["id"] for m in body["data"]] == [shipped_bundle.name]  # the bundle, not its model.gguf


def test_completion_streamed_and_not(server, shipped_bundle):
    status, body = server.json("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    assert body["model"] == shipped_bundle.name and body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"]
    events, done = server.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert done and len(events) >= 8  # one event per token (and a last one with the finish reason)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events).strip()
    assert {e["model"] for e in events} == {shipped_bundle.name}


def test_three_concurrent_requests_are_queued(server):
    _s, before = server.json("/stats")
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0.7, "seed": 1}

    def streamed(_):
        events, done = server.stream("/v1/completions", body)
        return done and events[-1]["choices"][0]["finish_reason"]

    def plain(_):
        status, out = server.json("/v1/completions", body)
        return status == 200 and out["choices"][0]["finish_reason"]

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(streamed, 0), pool.submit(plain, 0), pool.submit(streamed, 0)]
        results = [f.result(timeout=300) for f in futures]
    # none was cut short by another (llama-cpp-python's server interrupts a stream when a request waits)
    assert results == ["length", "length", "length"]
    _ok(server)
    _s, after = server.json("/stats")
    assert after["requests"]["total"]["requests"] - before["requests"]["total"]["requests"] == 3
    assert after["requests"]["total"]["generated_tokens"] - before["requests"]["total"]["generated_tokens"] == 72


def test_chat_without_a_template_is_a_clear_400(server):
    for stream in (False, True):
        status, body = server.json("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                            "stream": stream})
        assert status == 400 and body["error"]["code"] == "no_chat_template"
        assert "--chat-format" in body["error"]["message"]


def test_bad_requests_get_one_400_and_the_server_stays_up(server):
    status, ctype, raw = server.request("/v1/completions", {"prompt": PROMPT, "max_tokens": "many"})
    assert status == 400 and ctype.startswith("application/json")
    err = json.loads(raw)["error"]
    assert err["param"] == "max_tokens" and "integer" in err["message"] and "\n" not in err["message"]
    status, _c, raw = server.request("/v1/completions", raw=b"{not json")
    assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_json"
    status, body = server.json("/v1/completions", {"prompt": "word " * (CTX + 100), "max_tokens": 4})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = server.json("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert "Traceback" not in server.text()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def test_stats_and_prometheus_metrics(server):
    server.json("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    status, st = server.json("/stats")
    assert status == 200
    ctl = st["controller"]
    assert ctl["budget_bytes"] == BUDGET and ctl["resident_expert_bytes"] > 0 and ctl["tokens"] > 0
    assert st["requests"]["last"]["generated_tokens"] == 6 and st["requests"]["last"]["generation_tokens_per_s"] > 0
    status, ctype, raw = server.request("/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    values = {}
    for line in raw.decode().splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) dymoe_\w+ ", line), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        values[m.group(1)] = float(m.group(3))  # float() reads NaN and +Inf as Prometheus writes them
    assert values["dymoe_budget_bytes"] == BUDGET
    assert values["dymoe_resident_expert_bytes"] > 0 and values["dymoe_bytes_read_total"] >= 0
    assert 0 <= values["dymoe_hit_rate"] <= 1 and 0 <= values["dymoe_lookahead_recall"] <= 1
    assert values["dymoe_generation_tokens_per_second"] > 0 and values["dymoe_prompt_tokens_per_second"] > 0
    assert values["dymoe_generated_tokens_total"] >= 6 and not math.isnan(values["dymoe_tokens_total"])


def test_sigterm_ends_a_running_stream_closes_the_model_and_frees_the_port(server):
    """Last test of the module: it stops the server."""
    got_some = threading.Event()
    result = {}

    def consume():
        result["events"], result["done"] = server.stream(
            "/v1/completions", {"prompt": PROMPT, "max_tokens": CTX - 16, "temperature": 0},
            on_event=lambda ev: len(ev) >= 3 and got_some.set())

    t = threading.Thread(target=consume)
    t.start()
    assert got_some.wait(120), server.text()
    assert server.stop(signal.SIGTERM) == 0, server.text()
    t.join(60)
    # the running completion ended at its next token, well before its max_tokens
    assert result["done"] and result["events"][-1]["choices"][0]["finish_reason"] == "stop"
    assert len(result["events"]) < CTX - 16
    assert "model closed" in server.text() and "Traceback" not in server.text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5)


def test_chat_with_a_template_and_sigint(chat_bundle, tmp_path):
    s = Server(chat_bundle, tmp_path / "chat.log", "--budget", "8MiB")
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
        status, body = s.json("/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0})
        assert status == 200, body
        msg = body["choices"][0]["message"]
        assert msg["role"] == "assistant" and isinstance(msg["content"], str) and body["model"] == chat_bundle.name
        assert body["usage"]["completion_tokens"] <= 6
        events, done = s.stream("/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0})
        assert done and events[0]["choices"][0]["delta"].get("role") == "assistant"
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        assert s.stop(signal.SIGINT) == 0, s.text()


def test_serve_bad_input_is_one_line(shipped_bundle, tmp_path):
    from click.testing import CliRunner

    from dymoe_gguf.cli import cli

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cases = [([str(tmp_path / "missing.dymoe"), "--port", "0"], "does not exist"),
                 ([str(shipped_bundle), "--port", str(busy.getsockname()[1])], "Address already in use"),
                 ([str(shipped_bundle), "--port", "0", "--chat-format", "nonsense"], "Unknown chat format"),
                 ([str(shipped_bundle), "--port", "0", "--budget", "lots"], "memory budget")]
        for args, message in cases:
            res = CliRunner().invoke(cli, ["serve", *args])
            assert res.exit_code == 1 and message in res.output, (args, res.output)
            assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    finally:
        busy.close()
