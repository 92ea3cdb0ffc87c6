"""The one way the benchmarks time decoding, and the arithmetic they share.

``decode_times`` is the TPOT loop of ``bench`` (worker), ``bench -m``, ``scripts/bench_runtime.py`` and
``scripts/bench_views.py``: each step is ``llm.eval([token])`` and the choice of the next token (argmax
of the last logits), timed with ``perf_counter``; warm-up steps run first, untimed. The tokens come from
a fixed feed (every configuration routes the same inputs) or greedily from the model's own output.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    return a / b if a is not None and b else None


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as llama-bench reports them."""
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def next_token(llm: Any) -> int:
    """Greedy choice: argmax of the last evaluated token's logits."""
    from dymoe_gguf._native.llama import last_logits

    return int(last_logits(llm).argmax())


def eval_prompt(llm: Any, tokens: Sequence[int]) -> int:
    """Reset the context, evaluate ``tokens`` as one batch; returns the greedy next token."""
    llm.reset()
    llm.eval(list(tokens))
    return next_token(llm)


def decode_times(llm: Any, steps: int | Sequence[int], *, first: int | None = None, warmup: int = 0,
                 on_step: Callable[[], None] | None = None) -> list[float]:
    """Seconds per single-token decode step, after the prompt has been evaluated.

    ``steps``: a token feed (each step evaluates the next one) or a count (greedy: each step evaluates
    the model's own argmax, starting from ``first`` or the current argmax). ``warmup`` steps of the same
    kind run first and are not returned. ``on_step`` runs after each timed step, outside the timing.
    """
    feed = None if isinstance(steps, int) else list(steps)
    n = len(feed) if feed is not None else int(steps)
    tok = next_token(llm) if first is None else int(first)
    times: list[float] = []
    for i in range(warmup + n):
        if feed is not None and i >= warmup:
            tok = feed[i - warmup]
        t0 = time.perf_counter()
        llm.eval([tok])
        nxt = next_token(llm)
        dt = time.perf_counter() - t0
        if feed is None or i < warmup:
            tok = nxt
        if i >= warmup:
            times.append(dt)
            if on_step is not None:
                on_step()
    return times
