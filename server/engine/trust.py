"""Whether one of our Triton kernels may serve here: its check against the ops it replaces, run once.

A kernel is used only after it matched on this device (its check returns True). No Triton, a kernel that
fails to build, or a mismatch leaves the unfused ops serving, logged: a kernel may cost speed, never a token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("loraserve.kernels")


def passes(check: Callable[[], bool], *, kernel: str, instead: str) -> bool:
    """check() (which imports the kernel's module and compares it), or False, logged, where it fails."""
    try:
        matched = check()
    except Exception:  # no Triton, or no kernel for this device
        log.exception("the %s kernel is unavailable; %s", kernel, instead)
        return False
    if not matched:
        log.warning("the %s kernel differs from the ops it replaces here; %s", kernel, instead)
    return matched
