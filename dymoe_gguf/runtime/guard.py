"""What keeps a controlled ``Llama`` from crashing the process when it is misused.

llama.cpp itself aborts or segfaults when a freed model is used, when two threads decode on one
context, or when Python raises inside its eval callback (ctypes swallows the exception and the
decode runs on). The guard turns each of these into a Python exception:

* every decode (and sample) holds the guard's lock; a second thread that tries to decode at the
  same time gets :class:`ConcurrentUseError` instead of a ``GGML_ASSERT`` abort;
* :meth:`Guard.close` marks the guard closed and waits for a running decode to end before the
  model is freed; afterwards the ``Llama`` object raises :class:`ClosedError` on any use;
* an exception raised in the eval callback (Ctrl-C included) is recorded, the rest of the graph
  is skipped (the callback stops the scheduler's node loop), and the exception is raised again in
  the decoding thread when ``eval`` returns; the tokens of the failed batch are forgotten.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from dymoe_gguf.errors import DymoeError, RuntimeConfigError


class ClosedError(RuntimeConfigError):
    """The Llama belongs to a closed controller."""


class ConcurrentUseError(RuntimeConfigError):
    """Two threads decoded on one Llama at once."""


class Guard:
    """One per controlled ``Llama``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.closed = False
        self.pending: BaseException | None = None  # raised in the eval callback, not yet re-raised

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Hold the model for one decode (or sample) in this thread.

        In the main thread, SIGINT is caught for the duration (Python would otherwise raise
        KeyboardInterrupt wherever it happens to be, which inside the eval callback ctypes ignores):
        the decode stops and KeyboardInterrupt is raised when it returns.
        """
        if self.closed:
            raise ClosedError(CLOSED)
        if not self._lock.acquire(blocking=False):
            raise ConcurrentUseError("This Llama is decoding in another thread: a Llama serves one thread "
                                     "at a time (serialise the calls with a lock or a queue)")
        previous = None
        try:
            if self.closed:
                raise ClosedError(CLOSED)
            if threading.current_thread() is threading.main_thread():
                previous = signal.signal(signal.SIGINT, self._interrupt_handler(signal.getsignal(signal.SIGINT)))
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self._lock.release()
        self.raise_pending()

    def _interrupt_handler(self, previous: object) -> Callable[[int, object], None]:
        def handler(signum: int, frame: object) -> None:
            try:
                if callable(previous):
                    previous(signum, frame)  # Python's default raises KeyboardInterrupt
                elif previous == signal.SIG_DFL:
                    raise KeyboardInterrupt
            except BaseException as exc:  # recorded: raised when the decode has stopped
                self.fail(exc)

        return handler

    def fail(self, exc: BaseException) -> None:
        """Record an exception raised inside the eval callback (the first one wins)."""
        if self.pending is None:
            self.pending = exc

    @property
    def failing(self) -> bool:
        """Whether the current decode should stop (an exception is waiting to be raised)."""
        return self.pending is not None

    def raise_pending(self) -> None:
        """Raise the exception recorded during the decode that just returned, if any."""
        exc, self.pending = self.pending, None
        if exc is None:
            return
        if isinstance(exc, (KeyboardInterrupt, DymoeError)):
            raise exc
        raise DymoeError(f"The runtime failed inside llama.cpp's eval callback: {exc!r}") from exc

    def close(self, timeout: float = 600.0) -> None:
        """Refuse new decodes and wait (up to ``timeout`` s) for a running one to end."""
        self.closed = True
        if self._lock.acquire(timeout=timeout):
            self._lock.release()


CLOSED = ("This Llama belongs to a closed dymoe-gguf Controller (closed explicitly or by leaving its "
          "'with' block): open the bundle again to keep generating")
