"""The server's one model: a :class:`~dymoe_gguf.runtime.session.Session` that lives on its own thread.

llama-cpp-python's server routes call the ``Llama`` from a pool of worker threads (one request at a
time, behind its locks; a stream moves between threads from one token to the next). Here every call
into the ``Llama`` — opening it, each completion, each next token of a stream, closing it — runs on
one dedicated thread, one call after another, so two threads never use it whatever the routes do.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dymoe_gguf.runtime.session import Meter, Session, Timings, with_meter

log = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()


class ModelThread:
    """Opens a session on a dedicated thread and runs every later call into it there, in order."""

    def __init__(self, open_session: Callable[[], Session]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dymoe-model")
        try:
            self.session: Session = self._pool.submit(open_session).result()
        except BaseException:
            self._pool.shutdown(wait=True)
            raise
        self._lock = threading.Lock()  # guards the timings, read by the stats routes
        self.stopping = threading.Event()  # set on shutdown: running completions end at their next token
        self.total = Timings()
        self.last: Timings | None = None
        self._closed = False

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the model thread; waits for it (and for the calls queued before it)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` on the model thread, without waiting."""
        if not self._closed:
            self._pool.submit(fn, *args)

    def record(self, meter: Meter) -> None:
        """Add one request's timings."""
        t = meter.timings()
        if t.requests:
            with self._lock:
                self.total.add(t)
                self.last = t

    def timings(self) -> tuple[Timings, Timings | None]:
        """A copy of the totals and of the last request's timings."""
        with self._lock:
            total = Timings(**vars(self.total))
            return total, None if self.last is None else Timings(**vars(self.last))

    def llama(self, alias: str) -> SerialLlama:
        """The ``Llama`` stand-in for the routes; completions name the model ``alias``."""
        return SerialLlama(self, alias)

    def close(self) -> None:
        """Close the session on its thread, after the calls already queued. Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        try:
            self._pool.submit(self.session.close).result()
        finally:
            self._pool.shutdown(wait=True)


class SerialLlama:
    """Stands in for the ``Llama`` in llama-cpp-python's routes: every method call runs on the model
    thread, streams advance there one token at a time, and completions are timed."""

    def __init__(self, model: ModelThread, alias: str) -> None:
        self._model = model
        self._llm = model.session.llm
        self._alias = alias

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._llm, name)
        if not callable(attr):
            return attr
        if name in ("create_completion", "create_chat_completion"):
            return functools.partial(self._complete, attr)
        return functools.partial(self._model.run, attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._complete(self._llm.create_completion, *args, **kwargs)

    def _complete(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        meters: list[Meter] = []

        kwargs["model"] = self._alias  # responses name the bundle, not its .gguf path

        def start() -> Any:
            meters.append(Meter(self._llm, self._model.stopping))
            return fn(*args, **with_meter(kwargs, meters[0]))

        result = self._model.run(start)
        if isinstance(result, Iterator):
            return _Stream(self._model, result, meters[0])
        self._model.record(meters[0])
        return result


class _Stream:
    """A completion stream whose every step runs on the model thread."""

    def __init__(self, model: ModelThread, it: Iterator[Any], meter: Meter) -> None:
        self._model = model
        self._it: Iterator[Any] | None = it
        self._meter = meter
        self._started = False

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            raise StopIteration
        if not self._started:
            self._started = True
            self._meter.restart()
        try:
            item = self._model.run(next, self._it, _END)
        except BaseException:
            self._finish()
            raise
        if item is _END:
            self._finish()
            raise StopIteration
        return item

    def _finish(self) -> None:
        if self._it is not None:
            self._it = None
            self._model.record(self._meter)

    def close(self) -> None:
        """Stop the stream (on the model thread: closing a generator runs its cleanup)."""
        it = self._it
        self._finish()
        if it is not None and hasattr(it, "close"):
            try:
                self._model.submit(it.close)
            except RuntimeError:  # the model thread is already gone
                pass

    def __del__(self) -> None:  # a client that went away leaves its stream unfinished
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter teardown
            pass
