"""The interface every quantization method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn

from llmq.activations import LayerInputs
from llmq.arch import Arch
from llmq.config import QuantizeConfig
from llmq.grid import QuantSpec
from llmq.qtensor import QuantizedTensor


@dataclass
class LayerLog:
    """Per-module records a method emits (written as JSON lines next to the output)."""

    layer: int
    records: list[dict[str, Any]] = field(default_factory=list)
    listener: Callable[[str], None] | None = None  # progress display, told of each finished module

    def add(self, module: str, **info: Any) -> None:
        self.records.append({"layer": self.layer, "module": module, **info})
        if self.listener is not None:
            self.listener(module)


class Method(ABC):
    name: ClassVar[str]
    quantizes: ClassVar[bool] = True  # False: a plain dtype cast, no QuantizedTensors
    needs_calibration: ClassVar[bool] = False
    default_dataset: ClassVar[str] = "wikitext2"  # calibration text when the recipe names none
    default_seqlen: ClassVar[int] = 2048  # calibration window when the recipe names none (capped by the context)
    act_order_default: ClassVar[bool] = False  # what an unset act_order means for this method

    def __init__(self, cfg: QuantizeConfig):
        self.cfg = cfg

    @abstractmethod
    def quantize_layer(self, layer: nn.Module, arch: Arch, targets: dict[str, QuantSpec],
                       inputs: LayerInputs | None, log: LayerLog) -> dict[str, QuantizedTensor]:
        """Quantize ``targets`` (linear names relative to ``layer``, each with the grid it goes on:
        usually the recipe's for all, but a GGUF mix gives some linears more bits).

        On return every target's weight in ``layer`` holds its dequantized value, so the
        pipeline can compute the next layer's inputs from the quantized layer.
        """
