"""Calibration activations at the entrance of a decoder layer.

Captured once at layer 0 (with the keyword arguments the model passes its layers:
masks, position ids, rotary embeddings), then carried from layer to layer by
running each quantized layer over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

Observer = Callable[[torch.Tensor], None]


def _hidden(out: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers >= 5) or a tuple whose first item is one."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one (1, seqlen, hidden) tensor per calibration sample
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Samples per forward call.  Captured kwargs (masks, rotary tables) have batch 1 and broadcast.
    batch_size: int = 8

    @torch.no_grad()
    def run(self, layer: nn.Module, observers: Mapping[nn.Module, Observer] | None = None,
            keep_outputs: bool = False) -> list[torch.Tensor] | None:
        """Forward every sample through ``layer``; ``observers`` see the input of their module."""
        handles = [
            mod.register_forward_pre_hook(lambda _m, args, fn=fn: fn(args[0]))
            for mod, fn in (observers or {}).items()
        ]
        outputs: list[torch.Tensor] = []
        try:
            for i in range(0, len(self.hidden), self.batch_size):
                x = torch.cat(self.hidden[i : i + self.batch_size])
                y = _hidden(layer(x, **self.kwargs))
                if keep_outputs:
                    outputs.extend(y.split(1))
        finally:
            for h in handles:
                h.remove()
        return outputs if keep_outputs else None

    def advance(self, layer: nn.Module) -> None:
        """Replace the inputs by this layer's outputs: they are the next layer's inputs."""
        self.hidden = self.run(layer, keep_outputs=True)  # type: ignore[assignment]
