"""The server's model thread: every call into the Llama runs on it, whatever thread asks."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dymoe_gguf.runtime.session import Session
from dymoe_gguf.serve.model import ModelThread


@pytest.fixture(scope="module")
def model(shipped_bundle):
    m = ModelThread(lambda: Session.open(shipped_bundle, memory_budget="8MiB", n_ctx=1024))
    yield m
    m.close()


def test_calls_from_many_threads_run_on_the_model_thread(model):
    seen = set()

    def spy(_ids, scores):  # a logits processor: runs on the thread that decodes
        seen.add(threading.get_ident())
        return scores

    model_thread = model.run(threading.get_ident)
    llama = model.llama("tiny")
    before, _ = model.timings()
    # a stream advanced from several threads, as llama-cpp-python's routes do (one token per thread hop)
    stream = llama.create_completion("The history of", max_tokens=12, temperature=0, stream=True,
                                     logits_processor=[spy])
    with ThreadPoolExecutor(4) as pool:
        chunks = []
        while (c := pool.submit(next, stream, None).result()) is not None:
            chunks.append(c)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["model"] == "tiny"
    assert seen == {model_thread}
    # three completions at once from three threads, without the routes' locks
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda i: llama(prompt=f"Story {i}:", max_tokens=8, logits_processor=[spy]), range(3)))
    assert [o["usage"]["completion_tokens"] for o in outs] == [8, 8, 8]
    assert seen == {model_thread}
    total, last = model.timings()
    assert total.requests - before.requests == 4 and total.generated_tokens - before.generated_tokens == 36
    assert last is not None and last.generated_tokens == 8


def test_stopping_ends_a_running_stream_at_the_next_token(model):
    llama = model.llama("tiny")
    stream = llama.create_completion("The history of", max_tokens=500, temperature=0, stream=True)
    first = [next(stream) for _ in range(3)]
    model.stopping.set()
    try:
        rest = list(stream)
    finally:
        model.stopping.clear()
    assert rest[-1]["choices"][0]["finish_reason"] == "stop" and len(first) + len(rest) < 10
