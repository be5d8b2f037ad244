"""Reading the next decoder layer from disk while this one computes (GPU runs).

On a GPU a 7B layer's calibration takes seconds, and reading its weights from disk (then checking and
converting them on the CPU) would stall the GPU for a good part of that again.  A background thread reads
layer i+1 into pinned host memory while layer i runs, so that its copy to the device is asynchronous.  At most
one layer is read ahead: host memory holds one layer more, device memory nothing more.  On a CPU the
reading would compete with the calibration for the same cores: there it is off, and layers load when needed.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from llmq.source import ModelSource


class LayerPrefetch:
    """``start(prefix)`` reads that layer's tensors in the background; ``take(prefix)`` waits for them (None
    when it was never started, or when prefetching is off).  A read's error is raised by ``take``."""

    def __init__(self, source: ModelSource, model: nn.Module, dtype: torch.dtype, active: bool):
        self.source, self.model, self.dtype = source, model, dtype
        self.pin = torch.cuda.is_available()  # (pinned host memory needs a CUDA runtime)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmq-prefetch") if active else None
        self._pending: dict[str, Future] = {}

    def start(self, prefix: str) -> None:
        if self._pool is not None and prefix not in self._pending:
            self._pending[prefix] = self._pool.submit(self._read, self.model.get_submodule(prefix), prefix)

    def take(self, prefix: str) -> dict[str, torch.Tensor] | None:
        future = self._pending.pop(prefix, None)
        return None if future is None else future.result()

    def _read(self, module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        tensors = self.source.read(module, prefix, self.dtype)
        return {n: t.pin_memory() for n, t in tensors.items()} if self.pin else tensors

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> LayerPrefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
