"""Ctrl-C and SIGTERM stop a run the same way, even when a library swallows the KeyboardInterrupt.

Python raises KeyboardInterrupt wherever the main thread is when the signal lands.  When that is inside a
native library's call back into Python, the library may drop it and fail with an unrelated error instead:
safetensors' ``get_tensor`` interrupted there raises ``ValueError: could not determine the shape of object
type 'torch.storage.UntypedStorage'``, which llmq would then report as a corrupted checkpoint.  So the handler
also records the signal, and whoever turns an exception into an exit status asks ``received()`` first.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

# The signals this process received while stop_on_signals() was active.  Module state on purpose: a signal
# is delivered to the process, and the handler has nowhere else to put it.
_received: list[int] = []


def _stop(signum: int, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise KeyboardInterrupt and are remembered (main thread only)."""
    _received.clear()
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def received() -> bool:
    """Whether a stop signal arrived, even one a library swallowed."""
    return bool(_received)


def is_interrupt(exc_type: type[BaseException] | None) -> bool:
    """Whether an exception ends the run as an interrupt: a KeyboardInterrupt, or any error after a stop signal."""
    return exc_type is not None and (issubclass(exc_type, KeyboardInterrupt) or received())
