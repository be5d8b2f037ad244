"""The interface of a packed safetensors checkpoint format."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from llmq.errors import LlmqError
from llmq.grid import Grid, IntGrid
from llmq.qtensor import QuantizedTensor


class Format(ABC):
    name: str  # what --format calls it
    quant_method: str  # quantization_config.quant_method
    suffixes: tuple[str, ...]  # tensors replacing a linear's "weight"
    markers: tuple[str, ...] = ()  # the tensors that mark a packed linear (default: the first suffix)
    mixes_grids: bool = False  # whether quantization_config can give linears different grids (per-module rules)
    quantizes_head: bool = False  # whether its runtimes read a packed output head (lm_head)

    def is_packed(self, has: Callable[[str], bool]) -> bool:
        """Whether a linear is packed, given ``has(suffix)``: does the checkpoint hold that tensor of it."""
        return any(has(m) for m in (self.markers or self.suffixes[:1]))

    def for_dtype(self, dtype: str) -> "Format":
        """This format writing for unquantized tensors of ``dtype`` (bitsandbytes records it per tensor)."""
        return self

    def check(self, grid: Grid) -> None:
        """Raise LlmqError, before any work, when this format cannot represent the recipe."""
        require_int_grid(self.name, grid)

    @abstractmethod
    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Tensors (by suffix) replacing a linear's 'weight'.  Raises LlmqError if unrepresentable."""

    def packed_suffixes(self, grid: Grid) -> tuple[str, ...]:
        """The tensors pack() writes for a linear on ``grid`` (for sizing a file's header)."""
        return self.suffixes

    @abstractmethod
    def nbytes(self, out: int, inp: int, grid: IntGrid) -> int:
        """Bytes pack() writes for an (out x in) linear: for size projections without packing."""

    @abstractmethod
    def unpack(self, tensors: dict[str, torch.Tensor], grid: IntGrid, shape: tuple[int, int]) -> QuantizedTensor:
        """The inverse of pack for a linear of ``shape`` (out, in)."""

    @abstractmethod
    def quantization_config(self, grid: IntGrid, extra: dict[str, Any]) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json: ``grid`` the most common one; a format that mixes
        grids also gets ``extra["grids"]``, the grid of every quantized linear by checkpoint name."""

    @abstractmethod
    def grid_from_config(self, qcfg: dict[str, Any]) -> IntGrid:
        """Read back the (base) grid description from ``quantization_config``."""

    def module_grid(self, qcfg: dict[str, Any], module: str) -> Grid:
        """The grid of the linear ``module`` (checkpoint name): the base grid, unless the format mixes grids."""
        return self.grid_from_config(qcfg)


def natural_g_idx(qt: QuantizedTensor) -> bool:
    """True when column j belongs to group j // group_size (no act-order permutation stored)."""
    n = qt.codes.shape[1]
    gs = qt.grid.effective_group_size(n)
    return bool(torch.equal(qt.g_idx.long(), torch.arange(n) // gs))


def require_int_grid(fmt: str, grid: Grid) -> None:
    """Layouts with one scale and an integer zero per group hold the integer grids only, not the grids
    of other file formats (GGUF's float minimums and quantized group scales)."""
    if not isinstance(grid, IntGrid):
        raise refuse(fmt, f"the {grid.name} grid exists only in its own file format; use --format gguf")


def refuse(fmt: str, why: str) -> LlmqError:
    return LlmqError(f"format {fmt!r} cannot represent this: {why}")
