"""Sections of model code that a cancel must not cut in half.

Loading or unloading a LoRA or an embedding changes the one shared pipeline in several steps; an
exception between two of them would leave it half-changed for every later request. The server
(cog_base/cog016/cancel.py) delays a cancel that arrives inside a section until the section ends. No Cog
here: outside a server this only counts.
"""

from __future__ import annotations

import contextlib

_depth = 0


@contextlib.contextmanager
def section():
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def active() -> bool:
    return _depth > 0
