"""Generation from a bundle: one controller and its ``Llama``, streamed completion and chat, timings.

    with Session.open("model.dymoe", memory_budget="2GiB") as s:
        for piece in s.complete("The history of", max_tokens=64):
            print(piece, end="", flush=True)
        print(s.summary())

``run`` and ``chat`` use it directly; ``serve`` opens one on its model thread. Timings come from a
:class:`Meter`, a no-op logits processor that llama-cpp-python calls once per sampled token: its
first call marks the end of the prompt, the others the generated tokens.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dymoe_gguf._native.llama import interrupts_deferred
from dymoe_gguf.errors import RuntimeConfigError
from dymoe_gguf.runtime.controller import Controller
from dymoe_gguf.util import human_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """llama-cli's sampling flags; temperature 0 means greedy (the default, reproducible)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None  # None or negative: a random seed

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Llama.create_completion`` / ``create_chat_completion``."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                "repeat_penalty": self.repeat_penalty,
                "seed": self.seed if self.seed is not None and self.seed >= 0 else None}


@dataclass
class Timings:
    """Prompt and generated tokens and the seconds they took, summed over requests."""

    requests: int = 0
    prompt_tokens: int = 0  # evaluated (a prefix already in the KV cache is not evaluated again)
    prompt_seconds: float = 0.0
    generated_tokens: int = 0  # sampled, the end-of-generation token included
    generation_seconds: float = 0.0  # from the first sampled token to the last

    def add(self, other: Timings) -> None:
        """Accumulate ``other`` into this one."""
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    @property
    def prompt_tps(self) -> float | None:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else None

    @property
    def generation_tps(self) -> float | None:
        # n sampled tokens need n - 1 decodes after the prompt's
        decodes = self.generated_tokens - self.requests
        return decodes / self.generation_seconds if self.generation_seconds > 0 and decodes > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)
        d["prompt_tokens_per_s"] = _round(self.prompt_tps)
        d["generation_tokens_per_s"] = _round(self.generation_tps)
        return d


def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


class Meter:
    """A logits processor that changes nothing and times the prompt and every sampled token (and,
    given a ``stop`` event, ends the generation early once it is set).

    Create it just before the completion starts (it snapshots the KV cache's tokens to tell how
    much of the prompt is reused).
    """

    def __init__(self, llm: Any, stop: threading.Event | None = None) -> None:
        self._llm = llm
        self._stop = stop  # once set, the next token is end-of-generation (a server shutting down)
        self.interrupts: list[int] = []  # SIGINTs recorded: the next token is end-of-generation
        self._before = _context(llm)
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.calls = 0
        self.prompt_tokens = 0

    def restart(self) -> None:
        """Start the clock now (a stream is consumed later than it is created)."""
        if self.calls == 0:
            self.t0 = time.perf_counter()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        now = time.perf_counter()
        if self.calls == 0:
            self.first = now
            ctx = _context(self._llm)  # the prompt, as it is in the context now
            same = 0
            for a, b in zip(self._before, ctx):
                if a != b:
                    break
                same += 1
            if same == len(ctx):  # llama-cpp-python evaluates the last prompt token again
                same -= 1
            self.prompt_tokens = max(0, len(ctx) - same)
        self.calls += 1
        self.last = now
        if self.interrupts or (self._stop is not None and self._stop.is_set()):
            eos = self._llm.token_eos()
            keep = scores[eos]
            scores[:] = -np.inf
            scores[eos] = keep
        return scores

    def timings(self) -> Timings:
        """What this meter saw, as one request."""
        if self.first is None or self.last is None:
            return Timings(requests=0)
        return Timings(requests=1, prompt_tokens=self.prompt_tokens, prompt_seconds=self.first - self.t0,
                       generated_tokens=self.calls, generation_seconds=self.last - self.first)


@contextlib.contextmanager
def _ctrl_c_ends(meter: Meter) -> Iterator[None]:
    """During a generation, Ctrl-C ends it at the next token and KeyboardInterrupt is raised when it
    has ended: raised wherever the signal lands, it could land inside a ctypes callback llama.cpp
    calls, where it is swallowed and the generation goes on."""
    with interrupts_deferred() as meter.interrupts:
        yield
    if meter.interrupts:
        raise KeyboardInterrupt


def _context(llm: Any) -> list[int]:
    """The tokens in ``llm``'s KV cache (``input_ids`` is allocated for the whole context)."""
    return llm.input_ids[: llm.n_tokens].tolist()


def with_meter(kwargs: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """``kwargs`` of a completion call with ``meter`` added to its logits processors."""
    from llama_cpp import LogitsProcessorList

    out = dict(kwargs)
    out["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), meter])
    return out


class Session:
    """A bundle opened for generation: its controller, its ``Llama`` and the timings of what it generated."""

    def __init__(self, ctl: Controller, llm: Any, name: str, chat_format: str | None) -> None:
        self.ctl = ctl
        self.llm = llm
        self.name = name  # the bundle's directory name
        self.chat_format = chat_format
        self.timings = Timings()

    @classmethod
    def open(cls, bundle: str | Path, *, n_ctx: int = 0, n_threads: int | None = None,
             chat_format: str | None = None, **policy: Any) -> Session:
        """Open ``bundle`` under ``policy`` (``Controller.open`` options); ``n_ctx`` 0 = the training context."""
        if chat_format is not None:
            check_chat_format(chat_format)
        ctl, llm = _open(bundle, _padded(n_ctx), n_threads, chat_format, policy)
        if len(llm.input_ids) != llm.n_ctx():  # 0: a training context llama.cpp padded; open it padded
            padded = int(llm.n_ctx())
            ctl.close()
            ctl, llm = _open(bundle, padded, n_threads, chat_format, policy)
        s = cls(ctl, llm, Path(bundle).resolve().name, chat_format)
        st = ctl.stats()
        log.info("opened %s: context %d tokens, %s views, policy %s, budget %s", s.name, llm.n_ctx(), st.mode,
                 st.policy, "unlimited" if st.budget_bytes is None else human_bytes(st.budget_bytes))
        return s

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    @property
    def has_chat_template(self) -> bool:
        return "tokenizer.chat_template" in self.llm.metadata

    def check_chat(self) -> None:
        """Refuse chat when there is no template to format it (never llama-cpp-python's ``llama-2`` guess)."""
        if self.chat_format is None and not self.has_chat_template:
            raise RuntimeConfigError(f"{self.name} has no chat template: pass --chat-format "
                                     "(e.g. chatml, llama-2, mistral-instruct, gemma)")

    def count_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` as a completion sees it (BOS included)."""
        return len(self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))

    def complete(self, prompt: str, *, max_tokens: int = 64, sampling: Sampling = Sampling()) -> Iterator[str]:
        """Stream the text generated after ``prompt`` (``max_tokens`` <= 0: until the end of
        generation or of the context). A prompt that does not fit is refused here, before any text."""
        n = self.count_tokens(prompt)
        if n >= self.n_ctx:
            raise RuntimeConfigError(f"The prompt is {n} tokens but the context holds {self.n_ctx}: pass a "
                                     f"larger -c/--ctx (the model was trained on {self.n_ctx_train}) or a "
                                     "shorter prompt")
        if max_tokens > 0 and n + max_tokens > self.n_ctx:
            log.warning("the context holds %d tokens: generation stops after %d", self.n_ctx, self.n_ctx - n)
        return self._complete(prompt, max_tokens, sampling)

    def _complete(self, prompt: str, max_tokens: int, sampling: Sampling) -> Iterator[str]:
        meter = Meter(self.llm)
        stream = self.llm.create_completion(prompt, max_tokens=max_tokens if max_tokens > 0 else None, stream=True,
                                            **with_meter(sampling.kwargs(), meter))
        try:
            with _ctrl_c_ends(meter):
                for chunk in stream:
                    yield chunk["choices"][0]["text"]
        finally:
            self.timings.add(meter.timings())

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int = -1,
             sampling: Sampling = Sampling()) -> Iterator[str]:
        """Stream the assistant's reply to ``messages``. Where the conversation no longer fits the
        context, its oldest exchanges are dropped from ``messages`` (a system message is kept)."""
        self.check_chat()
        while True:
            meter = Meter(self.llm)
            try:
                stream = iter(self.llm.create_chat_completion(
                    messages=messages, max_tokens=max_tokens if max_tokens > 0 else None, stream=True,
                    **with_meter(sampling.kwargs(), meter)))
                first = next(stream, None)
            except ValueError as exc:
                if "exceed context window" not in str(exc):
                    raise
                first_turn = 1 if messages and messages[0].get("role") == "system" else 0
                if len(messages) - first_turn <= 1:
                    raise RuntimeConfigError(f"This message does not fit the context of {self.n_ctx} tokens: "
                                             "pass a larger -c/--ctx or send a shorter one") from None
                del messages[first_turn]  # the oldest exchange: a message and the replies to it
                while len(messages) - first_turn > 1 and messages[first_turn].get("role") != "user":
                    del messages[first_turn]
                log.warning("the conversation no longer fits the context of %d tokens: dropped its oldest "
                            "exchange", self.n_ctx)
                continue
            break
        try:
            with _ctrl_c_ends(meter):
                for chunk in ([first] if first is not None else []):
                    yield from _delta(chunk)
                for chunk in stream:
                    yield from _delta(chunk)
        finally:
            self.timings.add(meter.timings())

    @property
    def n_ctx_train(self) -> int:
        """The context the model was trained on (GGUF ``{arch}.context_length``)."""
        meta = self.llm.metadata
        return int(meta.get(f"{meta.get('general.architecture', '')}.context_length", self.n_ctx))

    def stats(self) -> dict[str, Any]:
        """The controller's stats (``Controller.stats().to_dict()``)."""
        return self.ctl.stats().to_dict()

    def summary(self) -> str:
        """One human line: prompt and generation speed, resident experts against the budget, hit
        rate and look-ahead recall."""
        t = self.timings
        st = self.stats()
        parts = [f"prompt {t.prompt_tokens} tokens" + (f" {t.prompt_tps:.1f} tok/s" if t.prompt_tps else ""),
                 f"generation {t.generated_tokens} tokens" + (f" {t.generation_tps:.1f} tok/s"
                                                               if t.generation_tps else "")]
        if st.get("mode") == "off":
            parts.append("policy off (plain llama.cpp)")
        else:
            budget = st.get("budget_bytes")
            parts.append(f"experts resident {human_bytes(st.get('resident_expert_bytes') or 0)} / "
                         + ("no budget" if budget is None else f"budget {human_bytes(budget)}"))
            hit, recall = st.get("hit_rate"), st.get("lookahead_recall")
            parts.append("hit rate " + ("n/a" if hit is None else f"{100 * hit:.1f}%"))
            parts.append("look-ahead recall " + ("n/a" if recall is None else f"{recall:.2f}"))
        return " | ".join(parts)

    def close(self) -> None:
        """Close the controller (and with it the ``Llama``). Safe to repeat."""
        self.ctl.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CTX_PAD = 256  # llama.cpp rounds the context up to a multiple of this (llama-context.cpp, GGML_PAD)


def _padded(n_ctx: int) -> int:
    """``n_ctx`` as llama.cpp will use it. llama-cpp-python sizes its token buffer from the value it is
    given: an unpadded one makes a batch past it fail and single tokens past it vanish from it."""
    return -(-n_ctx // CTX_PAD) * CTX_PAD if n_ctx > 0 else 0


def _open(bundle: str | Path, n_ctx: int, n_threads: int | None, chat_format: str | None,
          policy: dict[str, Any]) -> tuple[Controller, Any]:
    ctl = Controller.open(bundle, **policy)
    try:
        return ctl, ctl.llama(n_ctx=n_ctx, n_threads=n_threads, chat_format=chat_format)
    except BaseException:
        ctl.close()
        raise


def _delta(chunk: dict) -> Iterator[str]:
    text = chunk["choices"][0].get("delta", {}).get("content")
    if text:
        yield text


def check_chat_format(name: str) -> None:
    """Refuse a chat format llama-cpp-python does not know, naming the ones it does."""
    from llama_cpp.llama_chat_format import LlamaChatCompletionHandlerNotFoundException, get_chat_completion_handler

    if name.startswith("chat_template."):  # a template of the model's own metadata
        return
    try:
        get_chat_completion_handler(name)
    except LlamaChatCompletionHandlerNotFoundException as exc:
        known = sorted(re.findall(r"'([^']+)'", str(exc).partition("valid formats:")[2]))
        raise RuntimeConfigError(f"Unknown chat format {name!r}: expected one of "
                                 f"{', '.join(known) or 'the formats llama-cpp-python registers'}") from None


def generate(bundle: Path, prompt: str, *, n_tokens: int = 64, n_threads: int | None = None, n_ctx: int = 0,
             sampling: Sampling = Sampling(), **policy: Any) -> dict:
    """Generate after ``prompt``; returns the text, the timings and the controller's stats."""
    with Session.open(bundle, n_ctx=n_ctx, n_threads=n_threads, **policy) as s:
        text = "".join(s.complete(prompt, max_tokens=n_tokens, sampling=sampling))
        stats = s.stats()
        timings = s.timings.to_dict()
    stats.pop("tiers_by_layer", None)
    return {"text": text, "timings": timings, "stats": stats}
