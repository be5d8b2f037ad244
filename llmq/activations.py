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


class _Observed(Exception):
    """Raised inside a forward once every observer has had its input (the rest is not needed)."""


def layer_hidden(out: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers >= 5) or a tuple whose first item is one."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one (1, seqlen, hidden) tensor per calibration sample
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Samples per forward call.  Captured kwargs (masks, rotary tables) have batch 1 and broadcast.
    batch_size: int = 8
    # Which observed module sets (by layer class and module names) were seen to run once per forward.
    _single_call: dict[tuple[str, ...], bool] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def run(self, layer: nn.Module, observers: Mapping[nn.Module, Observer] | None = None,
            keep_outputs: bool = False) -> list[torch.Tensor] | None:
        """Forward every sample through ``layer``; ``observers`` see the input of their module.

        Without ``keep_outputs`` nothing downstream of the last observed module matters, so
        once every observer has seen its input the rest of the forward is skipped (true-sequential
        GPTQ's q/k/v pass, for instance, then costs two matmuls instead of a whole layer).  This
        relies on each observed module running once per forward, which a first full batch checks
        (once per layer class and module names, not once per layer); if it does not,
        every batch runs in full.
        """
        observers = dict(observers or {})
        calls: dict[nn.Module, int] = {}
        may_stop = bool(observers) and not keep_outputs
        key = (type(layer).__name__, *(n for n, m in layer.named_modules() if m in observers)) if may_stop else ()

        def pre_hook(mod: nn.Module, args: tuple) -> None:
            observers[mod](args[0])
            calls[mod] = calls.get(mod, 0) + 1
            if may_stop and len(calls) == len(observers) and self._single_call.get(key, False):
                raise _Observed

        handles = [mod.register_forward_pre_hook(pre_hook) for mod in observers]
        outputs: list[torch.Tensor] = []
        try:
            for i in range(0, len(self.hidden), self.batch_size):
                x = torch.cat(self.hidden[i : i + self.batch_size])
                calls.clear()
                try:
                    y = layer_hidden(layer(x, **self.kwargs))
                except _Observed:
                    continue
                if keep_outputs:
                    outputs.extend(y.split(1))
                if may_stop and key not in self._single_call:
                    self._single_call[key] = len(calls) == len(observers) and all(n == 1 for n in calls.values())
        finally:
            for h in handles:
                h.remove()
        return outputs if keep_outputs else None

    def first_batch(self) -> torch.Tensor:
        """The samples of the first forward call, as ``run`` batches them (for quick checks)."""
        return torch.cat(self.hidden[: self.batch_size])

    def advance(self, layer: nn.Module) -> None:
        """Replace the inputs by this layer's outputs: they are the next layer's inputs."""
        self.hidden = self.run(layer, keep_outputs=True)  # type: ignore[assignment]
