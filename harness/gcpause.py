"""Pausing Python's cyclic garbage collector around blocks that build millions of acyclic objects."""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def gc_paused():
    """The cyclic garbage collector off for the block (JSON parsing, COCO indexing): its repeated
    full passes over the millions of new dicts and lists cost more than the work itself. Reference
    counting still frees everything; the collector's previous state is restored on exit."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
