"""The one exception type that means "the user asked for something impossible".

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its
traceback, but for failures of the machine that the CLI says in one line too: running out of memory
(out_of_memory, here), a full disk and its like (the CLI's own list).
"""

from __future__ import annotations

import re

import torch


class LlmqError(Exception):
    """A user-facing error: bad path, bad option, unsupported model or data."""


# What the CPU allocator says when an allocation fails (its message differs between platforms).
_CPU_ALLOCATION_FAILED = ("can't allocate memory", "not enough memory")


def out_of_memory(e: BaseException) -> str | None:
    """One line saying that ``e`` is an allocation that failed (a GPU's, or the CPU allocator's), else None."""
    text = str(e).strip()
    if not (isinstance(e, (torch.OutOfMemoryError, MemoryError))
            or isinstance(e, RuntimeError) and any(m in text for m in _CPU_ALLOCATION_FAILED)):
        return None
    size = re.search(r"tried to allocate (\d+) bytes", text)  # (the CPU allocator's, within an enforce message)
    if size:
        return f"out of memory (an allocation of {int(size[1]) / 2**30:.2f} GiB failed)"
    return f"out of memory ({text.splitlines()[0] if text else type(e).__name__})"
