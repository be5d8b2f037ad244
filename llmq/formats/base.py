"""The interface of a packed checkpoint format."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from llmq.grid import QuantSpec
from llmq.qtensor import QuantizedTensor


class Format(ABC):
    name: str

    def check(self, spec: QuantSpec, act_order: bool) -> None:
        """Raise LlmqError when this format cannot represent the recipe."""

    @abstractmethod
    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Tensors (suffixes such as 'qweight') replacing a linear's 'weight'."""

    @abstractmethod
    def unpack(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> QuantizedTensor:
        """The inverse of pack for a linear of ``shape`` (out, in)."""

    @abstractmethod
    def quantization_config(self, spec: QuantSpec, extra: dict[str, Any]) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""

    @abstractmethod
    def spec_from_config(self, qcfg: dict[str, Any]) -> QuantSpec:
        """Read back the grid description from ``quantization_config``."""

    suffixes: tuple[str, ...] = ()
