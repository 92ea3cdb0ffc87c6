"""The page size every range is rounded to: the system's (sysconf), or a simulated larger one.

:func:`simulated_page_size` makes every range be rounded as a kernel with larger pages would round
it, on this kernel (tests run the pager on 16 KiB pages on a 4 KiB kernel): starts round down and
ends up to the simulated page, reads cover whole simulated pages, and mincore gives one entry per
simulated page (see :func:`dymoe_gguf._native.vm.mincore`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator

SYSTEM_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else mmap.PAGESIZE
_page = SYSTEM_PAGE


def page_size() -> int:
    """The page size ranges are rounded to: the system's, or the simulated one."""
    return _page


@contextlib.contextmanager
def simulated_page_size(size: int) -> Iterator[int]:
    """Round every range as a kernel with ``size``-byte pages would, on this kernel (tests)."""
    global _page
    if size < SYSTEM_PAGE or size % SYSTEM_PAGE or size & (size - 1):
        raise ValueError(f"Expected a power of two that is a multiple of the system page ({SYSTEM_PAGE}), "
                         f"got {size}")
    before = _page
    _page = size
    try:
        yield size
    finally:
        _page = before


def covering(offset: int, length: int) -> tuple[int, int, int]:
    """``(start, end, real_end)`` of the pages covering ``[offset, offset+length)``: start and end
    rounded out to the page size, ``real_end`` the end rounded to the system's page only (a call on
    a mapping goes no further: the mapping's owner may have unmapped what lies beyond the range)."""
    start = offset - offset % _page
    stop = offset + length
    return start, stop + (-stop % _page), stop + (-stop % SYSTEM_PAGE)


def span(offset, length):  # noqa: ANN001, ANN201 - ints or numpy arrays
    """Bytes of the whole pages covering ``[offset, offset+length)``: what the range costs in memory."""
    return ((offset + length + _page - 1) // _page - offset // _page) * _page
