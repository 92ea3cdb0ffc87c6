"""Where llama.cpp mapped a model file, found from the eval callback where the platform lists no
mappings (macOS has no /proc/self/maps).

A cold start needs the address before the warm-up decode reads anything. The scheduler asks the
eval callback about the graph's nodes before it computes the first one: a node reading a weight of
the file gives the mapping's base, its data pointer minus the weight's offset in the file (as
``Views.mapped_base`` does once the experts are discovered).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from dymoe_gguf._native.pages import SYSTEM_PAGE
from dymoe_gguf._native.tensor import name_of, tensor_at

log = logging.getLogger(__name__)


def base_of_node(ptr: int, offsets: Mapping[str, int]) -> int | None:
    """The mapping's base (file offset 0) from a weight, named in ``offsets`` (name -> file offset),
    that graph node ``ptr`` reads; None if it reads none."""
    for src in tensor_at(ptr).src:
        if src:
            off = offsets.get(name_of(src).decode(errors="replace"))
            data = tensor_at(src).data
            if off is not None and data and (data - off) % SYSTEM_PAGE == 0:
                return int(data) - off
    return None


class FirstWeight:
    """An eval callback that passes every call on to ``observer`` and, while nothing has been
    computed, looks for the mapping's base in the nodes asked about: found, ``on_found(base)`` runs
    once, before the scheduler computes anything."""

    def __init__(self, observer: Callable[[int, bool, int], bool], offsets: Mapping[str, int],
                 on_found: Callable[[int], object]) -> None:
        self.observer = observer
        self.offsets = offsets
        self.on_found = on_found
        self.looking = True
        self.base: int | None = None  # found, and on_found returned

    def __call__(self, ptr: int, ask: bool, user_data: int) -> bool:
        if self.looking:
            self.looking = bool(ask)  # a computed node: too late, weights have been read
            try:
                base = base_of_node(ptr, self.offsets) if ask else None
                if base is not None:
                    self.looking = False
                    self.on_found(base)
                    self.base = base
            except Exception:  # never unwind through C
                self.looking = False
                log.warning("could not find the model file's mapping from the graph", exc_info=True)
        return self.observer(ptr, ask, user_data)
