"""Work that later passes over a decoder layer can take from earlier ones.

True-sequential calibration runs a layer's forward once per linear group (q/k/v, o, gate/up,
down) and once more for the next layer's inputs, each time over every calibration window.  Most of
each pass repeats the one before: once o_proj has been reached with q/k/v already final, the
attention block's output is o_proj applied to an input that no later pass can change.

``Reuse`` keeps that input (per window batch) and serves the block's later calls with one o_proj
product instead of q/k/v, rotary embeddings and attention.  It applies to a direct child of the
layer (attention, MLP) whose output *is* the output tensor of one of its linears (its "ending"
linear), which a one-window probe checks per layer; the input is kept only while every linear the
forward ran before it is final (not ``pending``), so it is what every later pass would compute.
Inputs wider than twice the hidden size are not kept (an MLP's down_proj input would cost several
copies of the activations).  The ending linear itself is called on the kept input, so its hooks
still fire and its current weights are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

Forward = Callable[..., Any]


@dataclass
class Reuse:
    layer: nn.Module
    pending: set[nn.Module] = field(default_factory=set)  # linears whose weights may still change
    # child name -> (name in the child of its ending linear, how many Nones follow the hidden states in the
    # tuple the child returns; -1: it returns the tensor alone)
    _ends: dict[str, tuple[str, int]] | None = None
    _kept: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (batch, child) -> ending input
    last_pass: bool = False  # no pass follows this one: a kept input is let go once served

    def learn(self, x: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """Find each child's ending linear with one forward of ``x`` (one window is enough)."""
        children = {n: c for n, c in self.layer.named_children() if _linears(c)}
        outs: dict[nn.Module, list[Any]] = {}
        hooks = [m.register_forward_hook(lambda m, a, y: outs.setdefault(m, []).append(y))
                 for c in children.values() for m in [c, *_linears(c).values()]]
        try:
            with torch.no_grad():
                self.layer(x, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        self._ends = {}
        for name, child in children.items():
            got = outs.get(child, [])
            if len(got) != 1:
                continue  # called twice (or never) per forward: not one function of one input
            y, rest = (got[0][0], got[0][1:]) if isinstance(got[0], tuple) else (got[0], ())
            if any(r is not None for r in rest):
                continue  # returns more than the hidden states (router logits, attention weights)
            for lname, lin in _linears(child).items():
                if len(outs.get(lin, [])) == 1 and outs[lin][0] is y:
                    self._ends[name] = (lname, len(rest) if isinstance(got[0], tuple) else -1)

    def hooks(self, batch: Callable[[], int], width: int) -> Callable[[], None]:
        """Install this pass's hooks (``batch()`` names the batch being run, ``width`` is the hidden size);
        returns their removal.  Call ``start_forward`` before each forward."""
        if self._ends is None:
            raise RuntimeError("Reuse.learn must run before its hooks are installed")
        self._dirty = False
        handles = [m.register_forward_hook(self._mark_dirty) for m in self.pending]
        patched: list[nn.Module] = []
        for name, (lname, rest) in self._ends.items():
            child = self.layer.get_submodule(name)
            ending = child.get_submodule(lname)
            if ending.in_features > 2 * width:
                continue
            handles.append(ending.register_forward_pre_hook(self._keeper(batch, name)))
            if not any(m in self.pending for n, m in _linears(child).items() if n != lname):
                child.forward = self._server(batch, name, child, ending, rest)  # (instance attribute: removed below)
                patched.append(child)

        def remove() -> None:
            for h in handles:
                h.remove()
            for child in patched:
                del child.forward

        return remove

    def start_forward(self) -> None:
        self._dirty = False

    def _mark_dirty(self, module: nn.Module, args: tuple, out: Any) -> None:
        self._dirty = True

    def _keeper(self, batch: Callable[[], int], name: str) -> Callable[[nn.Module, tuple], None]:
        def keep(module: nn.Module, args: tuple) -> None:
            if not self._dirty and not self.last_pass:
                self._kept.setdefault((batch(), name), args[0])
        return keep

    def _server(self, batch: Callable[[], int], name: str, child: nn.Module, ending: nn.Module, rest: int) -> Forward:
        compute = type(child).forward.__get__(child)

        def forward(*args: Any, **kwargs: Any) -> Any:
            kept = (self._kept.pop if self.last_pass else self._kept.get)((batch(), name), None)
            if kept is None or self._dirty:  # (dirty: its input may differ from the kept pass's)
                return compute(*args, **kwargs)
            y = ending(kept)
            return y if rest < 0 else (y, *([None] * rest))
        return forward


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
