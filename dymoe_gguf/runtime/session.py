"""One-shot generation from a bundle under a policy (the ``run`` command)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dymoe_gguf.runtime.controller import Controller


def generate(bundle: Path, prompt: str, *, n_tokens: int = 64, n_threads: int | None = None, n_ctx: int = 2048,
             **policy: Any) -> dict:
    """Generate ``n_tokens`` greedily after ``prompt``; returns the text, timings and controller stats."""
    with Controller.open(bundle, **policy) as ctl:
        llm = ctl.llama(n_ctx=n_ctx, n_threads=n_threads)
        t0 = time.perf_counter()
        first = None
        pieces = []
        for chunk in llm.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, stream=True):
            if first is None:
                first = time.perf_counter() - t0
            pieces.append(chunk["choices"][0]["text"])
        total = time.perf_counter() - t0
        stats = ctl.stats().to_dict()
    stats.pop("tiers_by_layer", None)
    n = max(1, len(pieces))
    stats["ttft_s"] = round(first or total, 4)
    stats["tpot_s"] = round((total - (first or 0)) / max(1, n - 1), 5)
    return {"text": "".join(pieces), "stats": stats}
