"""glibc's mmap threshold: which CPU allocations get a mapping of their own, returned to the OS when freed.

glibc raises the threshold after each large free, so that later buffers of that size come from the heap.
Layer streaming wants the opposite (each layer's memory returned once the layer is done); a training loop
wants heap reuse (its per-step buffers are the same every step, and a fresh mapping costs page faults).
Setting the threshold pins it: glibc stops adjusting it.  No-op off glibc.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Iterator

M_MMAP_THRESHOLD = -3  # (mallopt's parameter number)
LAYER_BUFFERS = 1 << 20  # streaming: buffers from 1 MiB up in their own mappings
STEP_BUFFERS = 32 << 20  # training: up to glibc's largest threshold (64-bit) from the heap


def pin_mmap_threshold(nbytes: int) -> None:
    """Allocations of ``nbytes`` or more get their own mapping from now on, in this process."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):
        pass


@contextmanager
def step_buffers_from_heap() -> Iterator[None]:
    """Within, as a training loop wants: buffers below STEP_BUFFERS reused from the heap.  After, layer
    streaming's threshold (LAYER_BUFFERS) again."""
    pin_mmap_threshold(STEP_BUFFERS)
    try:
        yield
    finally:
        pin_mmap_threshold(LAYER_BUFFERS)
