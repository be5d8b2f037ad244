"""The interface every quantization method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from llmq.activations import LayerInputs
from llmq.arch import Arch
from llmq.distributed import Ranks
from llmq.grid import Grid
from llmq.qtensor import QuantizedTensor
from llmq.rounding import rtn_quantize


@dataclass(frozen=True)
class NoOptions:
    """A method without recipe keys of its own."""

    def validate(self) -> None:
        pass


@dataclass
class LayerLog:
    """Per-module records a method emits (written as JSON lines next to the output)."""

    layer: int
    records: list[dict[str, Any]] = field(default_factory=list)
    listener: Callable[[str], None] | None = None  # progress display, told of each finished module
    status: Callable[[str], None] | None = None  # progress display, told what a long step is doing

    def say(self, text: str) -> None:
        if self.status is not None:
            self.status(text)

    def add(self, module: str, **info: Any) -> None:
        self.records.append({"layer": self.layer, "module": module, **info})
        if self.listener is not None:
            self.listener(module)


class Method(ABC):
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions  # the method's own recipe keys, a frozen dataclass with validate()
    quantizes: ClassVar[bool] = True  # False: a plain dtype cast, no QuantizedTensors
    grid_search: ClassVar[bool] = True  # integer grids search their ranges unless the recipe says (llmq.grid)
    dtype: ClassVar[str | None] = None  # a cast's dtype for every tensor
    needs_calibration: ClassVar[bool] = False
    default_dataset: ClassVar[str] = "wikitext2"  # calibration text when the recipe names none
    default_seqlen: ClassVar[int] = 2048  # calibration window when the recipe names none (capped by the context)

    def __init__(self, options: Any = None, seed: int = 0, ranks: Ranks = Ranks()):
        self.options = options if options is not None else self.Options()
        self.seed = seed  # for methods that sample (AWQ's clipping rows)
        self.ranks = ranks  # the processes of a torchrun launch (llmq.distributed); alone by default

    def replay(self, layer: nn.Module, inputs: LayerInputs) -> None:
        """A resumed run passes a layer the interrupted run finished: ``layer`` is the unquantized layer and
        ``inputs`` the quantized model's inputs to it.  Methods that carry state from layer to layer (the
        unquantized model's activations) advance it here, exactly as quantize_layer would have."""

    @abstractmethod
    def quantize_layer(self, layer: nn.Module, arch: Arch, targets: dict[str, Grid],
                       inputs: LayerInputs | None, log: LayerLog) -> dict[str, QuantizedTensor]:
        """Quantize ``targets`` (linear names relative to ``layer``, each with the grid it goes on:
        usually the recipe's for all, but a GGUF mix gives some linears more bits).

        On return every target's weight in ``layer`` holds its dequantized value, so the
        pipeline can compute the next layer's inputs from the quantized layer.
        """

    def quantize_alone(self, W: torch.Tensor, H: torch.Tensor, grid: Grid) -> QuantizedTensor:
        """One linear quantized by itself, given the Hessian 2/N·XXᵀ of its inputs: what bit allocation
        probes each candidate grid with.  Rounding to nearest, unless the method has a per-linear solver."""
        return rtn_quantize(W.cpu().float(), grid)
