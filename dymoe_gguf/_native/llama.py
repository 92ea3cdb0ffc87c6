"""Building a ``llama_cpp.Llama`` with the parameters ``Llama(...)`` does not expose.

``Llama.__init__`` starts from ``llama_model_default_params()`` / ``llama_context_default_params()``;
wrapping those two functions for the duration of the constructor lets us set
``use_extra_bufts`` (repack, must be off for mmap paging and view swaps) and ``cb_eval`` (the
scheduler's eval callback, how routing is observed) without copying Llama's constructor.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()

# typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);
EvalCallback = Callable[[int, bool, int], bool]


@contextlib.contextmanager
def _defaults(model: dict[str, Any], context: dict[str, Any]) -> Iterator[None]:
    import llama_cpp.llama as high
    from llama_cpp import llama_cpp as low

    orig_m, orig_c = low.llama_model_default_params, low.llama_context_default_params

    def model_params():  # noqa: ANN202 - mirrors the ctypes function
        p = orig_m()
        for k, v in model.items():
            setattr(p, k, v)
        return p

    def context_params():  # noqa: ANN202
        p = orig_c()
        for k, v in context.items():
            setattr(p, k, v)
        return p

    with _LOCK:
        high.llama_cpp.llama_model_default_params = model_params  # type: ignore[attr-defined]
        high.llama_cpp.llama_context_default_params = context_params  # type: ignore[attr-defined]
        try:
            yield
        finally:
            high.llama_cpp.llama_model_default_params = orig_m  # type: ignore[attr-defined]
            high.llama_cpp.llama_context_default_params = orig_c  # type: ignore[attr-defined]


def make_eval_callback(fn: EvalCallback) -> Any:
    """Wrap a Python function as a ``ggml_backend_sched_eval_callback`` (keep a reference!)."""
    from llama_cpp import llama_cpp as low

    return low.ggml_backend_sched_eval_callback(fn)


@functools.cache
def _guarded_class() -> type:
    from llama_cpp import Llama

    class GuardedLlama(Llama):
        """A ``Llama`` whose decodes hold a guard (``dymoe_gguf.runtime.guard.Guard``): one thread at a
        time, none after close, and exceptions from the eval callback raised when the decode returns."""

        _dymoe_guard: Any = None

        def eval(self, tokens):  # noqa: ANN001, ANN201 - Llama's signature
            guard = self._dymoe_guard
            with guard.decoding():
                n_tokens = self.n_tokens
                try:
                    if guard.after_decode is None:
                        super().eval(tokens)
                    else:  # one decode per n_batch tokens (as Llama.eval does), each followed by the hook
                        for i in range(0, len(tokens), self.n_batch):
                            chunk = tokens[i:i + self.n_batch]
                            t0 = time.perf_counter()
                            super().eval(chunk)
                            guard.after_decode(len(chunk), time.perf_counter() - t0)
                    guard.raise_pending()
                except BaseException:
                    self.n_tokens = n_tokens  # the failed batch is forgotten: its KV cells are rewritten
                    raise

        def sample(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            with self._dymoe_guard.decoding():
                return super().sample(*args, **kwargs)

        def embed(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            with self._dymoe_guard.decoding():
                return super().embed(*args, **kwargs)

    return GuardedLlama


def retire(llm: Any, error: Exception) -> None:
    """After ``llm.close()``: any further use of ``llm`` raises ``error`` (a new instance of its
    type, same message) instead of reaching freed llama.cpp memory."""
    kind, message = type(error), str(error)

    class ClosedLlama:
        def __getattribute__(self, name: str) -> Any:
            if name in ("close", "__class__", "__dict__", "__repr__", "__del__"):
                return object.__getattribute__(self, name)
            raise kind(message)

        def close(self) -> None:
            """Already closed."""

        def __del__(self) -> None:
            pass

        def __repr__(self) -> str:
            return "<closed llama_cpp.Llama>"

    llm.__dict__.clear()
    llm.__class__ = ClosedLlama


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[list[int]]:
    """While llama.cpp works (loading a model, generating), SIGINT is recorded, not raised: it would be
    handled inside a ctypes callback llama.cpp calls (its log callback, a sampler), where ctypes swallows the
    KeyboardInterrupt and the interrupt is lost. The list yielded holds the signals recorded; the caller
    raises. Main thread only (elsewhere Python delivers no signal)."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, previous)


def open_llama(model_path: Path | str, *, repack: bool = False, cb_eval: Any = None, cb_user_data: Any = None,
               no_populate: bool = False, guard: Any = None, **kwargs: Any) -> Any:
    """A ``llama_cpp.Llama`` with repack switched off (default) and an optional eval callback.

    ``cb_eval`` must be an object from :func:`make_eval_callback` (or the patch's C callback, with
    ``cb_user_data`` a ctypes structure it reads), kept alive by the caller for the lifetime of the
    returned Llama. ``no_populate`` sets ``DYMOE_NO_POPULATE=1`` while loading: the
    patched llama.cpp then maps the file without reading it all (stock builds ignore it). With a
    ``guard`` the Llama is a guarded subclass (see :func:`_guarded_class`). Other keyword arguments
    go to ``Llama`` unchanged.
    """
    from llama_cpp import Llama

    cls = Llama
    if guard is not None:
        cls = _guarded_class()

    kwargs.setdefault("verbose", False)
    kwargs.setdefault("use_mmap", True)
    model = {"use_extra_bufts": bool(repack)}
    context: dict[str, Any] = {}
    if cb_eval is not None:
        user_data = ctypes.c_void_p(ctypes.addressof(cb_user_data) if cb_user_data is not None else None)
        context = {"cb_eval": cb_eval, "cb_eval_user_data": user_data}
    with _defaults(model, context):
        old = os.environ.get("DYMOE_NO_POPULATE")
        if no_populate:
            os.environ["DYMOE_NO_POPULATE"] = "1"
        try:
            with interrupts_deferred() as interrupted:
                llm = cls(model_path=str(model_path), **kwargs)
            if interrupted:
                llm.close()
                raise KeyboardInterrupt
            if guard is not None:
                llm._dymoe_guard = guard
            return llm
        finally:
            if no_populate:
                if old is None:
                    os.environ.pop("DYMOE_NO_POPULATE", None)
                else:
                    os.environ["DYMOE_NO_POPULATE"] = old


def vocab_special(llm: Any) -> tuple[bool, bool]:
    """``(add_bos, add_eos)`` of a ``Llama``'s vocabulary: what its tokenizer adds with ``add_special``."""
    from llama_cpp import llama_cpp as low

    vocab = low.llama_model_get_vocab(llm.model)
    return bool(low.llama_vocab_get_add_bos(vocab)), bool(low.llama_vocab_get_add_eos(vocab))


def last_logits(llm: Any) -> Any:
    """The logits of the last evaluated token, float32 [n_vocab], a view into llama.cpp's buffer
    (valid until the next decode). ``llama_get_logits_ith(ctx, -1)``: no copy, unlike ``llm.scores``."""
    import numpy as np
    from llama_cpp import llama_cpp as low

    ptr = low.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def build_features() -> dict[str, bool]:
    """What this llama.cpp build compiled in, from ``llama_print_system_info`` (``"AVX2 = 1 | ..."``):
    ``{"AVX2": True, "AMX_INT8": False, "REPACK": True, ...}`` for every ``NAME = 0|1`` it lists."""
    import llama_cpp

    text = llama_cpp.llama_print_system_info().decode(errors="replace")
    out = {}
    for part in text.replace(":", "|").split("|"):
        name, eq, value = part.partition("=")
        if eq and value.strip() in ("0", "1"):
            out[name.strip()] = value.strip() == "1"
    return out


def server_model(proxy: Any) -> None:
    """Make ``proxy`` the model llama-cpp-python's server routes use. They read the module's one
    private ``_llama_proxy``; its public setter would load a model from settings instead."""
    from llama_cpp.server import app

    app._llama_proxy = proxy
