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
The ending linear is called on the kept input while it may still change (or a pass observes it), so
its hooks fire and its current weights are used; once it is final its output is kept instead, and
later passes skip that product too.

Inputs wider than twice the hidden size (an MLP's down_proj input: several copies of the
activations) are kept only on CPU, and then in a temporary file (``Spill``), not in the process's
memory: the next layer's inputs then cost one down_proj product instead of the MLP's gate/up
products again, which on a CPU are the most expensive part of a pass.  Final outputs on CPU go to
the same file, so that the MLP's passes and solves (a run's peak memory) do not hold the attention's.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

Forward = Callable[..., Any]
Key = tuple[int, str]  # (batch, child)

log = logging.getLogger("llmq.reuse")


class Spill:
    """Tensors parked in an unlinked temporary file (in TMPDIR) and read back on demand.  The kernel's page
    cache holds them while memory is plentiful and writes them to disk when it is not; either way they
    are not the process's memory.  A failed write (disk full) turns the spill off: the tensors are then
    recomputed, as if never kept."""

    def __init__(self) -> None:
        self._file = None
        self._end = 0
        self._where: dict[Key, tuple[int, torch.Size, torch.dtype]] = {}
        self.broken = False

    def __contains__(self, key: Key) -> bool:
        return key in self._where

    def put(self, key: Key, t: torch.Tensor) -> bool:
        """Park ``t`` under ``key``; whether it is parked (not after a failed write)."""
        if self.broken:
            return False
        if key in self._where:
            return True
        data = _bytes(t.detach().contiguous())
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="llmq-spill-")
            done = 0
            while done < len(data):
                done += os.pwrite(self._file.fileno(), data[done:], self._end + done)
        except OSError as e:
            log.warning("cannot spill activations to %s (%s); recomputing them instead", tempfile.gettempdir(), e)
            self.close()
            self.broken = True
            return False
        self._where[key] = (self._end, t.shape, t.dtype)
        self._end += len(data)
        return True

    def get(self, key: Key, forget: bool = False) -> torch.Tensor | None:
        where = self._where.pop(key, None) if forget else self._where.get(key)
        if where is None:
            return None
        offset, shape, dtype = where
        out = torch.empty(shape, dtype=dtype)
        buf, got = _bytes(out), 0
        while got < len(buf):
            n = os.preadv(self._file.fileno(), [buf[got:]], offset + got)
            if n <= 0:
                raise RuntimeError("the activation spill file came back short")
            got += n
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._where, self._end = None, {}, 0


def _bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory, as bytes (any dtype: bf16 has no numpy type, bytes do)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@dataclass
class Reuse:
    layer: nn.Module
    pending: set[nn.Module] = field(default_factory=set)  # linears whose weights may still change
    # child name -> (name in the child of its ending linear, how many Nones follow the hidden states in the
    # tuple the child returns; -1: it returns the tensor alone)
    _ends: dict[str, tuple[str, int]] | None = None
    _kept: dict[Key, torch.Tensor] = field(default_factory=dict)  # -> the ending's input
    _outputs: dict[Key, torch.Tensor] = field(default_factory=dict)  # -> the (final) ending's output
    _spill: Spill = field(default_factory=Spill)  # -> a wide ending's input
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

    def hooks(self, batch: Callable[[], int], width: int, observed: set[nn.Module] = frozenset()) -> Callable[[], None]:
        """Install this pass's hooks (``batch()`` names the batch being run, ``width`` is the hidden size,
        ``observed`` the modules whose inputs the pass observes); returns their removal.  Call
        ``start_forward`` before each forward."""
        if self._ends is None:
            raise RuntimeError("Reuse.learn must run before its hooks are installed")
        self._dirty = False
        handles = [m.register_forward_hook(self._mark_dirty) for m in self.pending]
        patched: list[nn.Module] = []
        for name, (lname, rest) in self._ends.items():
            child = self.layer.get_submodule(name)
            ending = child.get_submodule(lname)
            wide = ending.in_features > 2 * width
            handles.append(ending.register_forward_pre_hook(self._keeper(batch, name, wide)))
            inner = [m for n, m in _linears(child).items() if n != lname]
            # Served only if its other linears are final and unobserved: serving skips them, and an observer
            # of one would miss its input (the ending's own observer still sees it: _serve calls it).
            if not any(m in self.pending or m in observed for m in inner):
                # (an instance attribute: removed below)
                child.forward = self._server(batch, name, child, ending, rest, ending in observed)
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

    def close(self) -> None:
        """Let go of everything kept (the layer's passes are over)."""
        self._kept.clear()
        self._outputs.clear()
        self._spill.close()

    def _keeper(self, batch: Callable[[], int], name: str, wide: bool) -> Callable[[nn.Module, tuple], None]:
        def keep(module: nn.Module, args: tuple) -> None:
            key, x = (batch(), name), args[0]
            if self._dirty or self.last_pass:
                return
            if not wide:
                self._kept.setdefault(key, x)
            elif x.device.type == "cpu":
                self._spill.put(key, x)
        return keep

    def _server(self, batch: Callable[[], int], name: str, child: nn.Module, ending: nn.Module, rest: int,
                observed: bool) -> Forward:
        compute = type(child).forward.__get__(child)

        def forward(*args: Any, **kwargs: Any) -> Any:
            y = self._serve((batch(), name), ending, observed)
            if y is None:
                return compute(*args, **kwargs)
            return y if rest < 0 else (y, *([None] * rest))
        return forward

    def _serve(self, key: Key, ending: nn.Module, observed: bool) -> torch.Tensor | None:
        """The child's output from what was kept, or None: compute it."""
        last = self.last_pass
        if self._dirty:  # (its input may differ from the kept pass's)
            return None
        if not observed:  # (an observed ending must run: its observer sees its input)
            y = (self._outputs.pop if last else self._outputs.get)(key, None)
            if y is not None:
                return y if last else y.clone()  # (a copy: the caller may change it in place)
            y = self._spill.get(_output(key), forget=last)  # (read back: a fresh tensor)
            if y is not None:
                return y
        kept = (self._kept.pop if last else self._kept.get)(key, None)
        if kept is None:
            kept = self._spill.get(key, forget=last)
        if kept is None:
            return None
        y = ending(kept)
        if not last and not observed and ending not in self.pending:  # final: its output is all later passes need
            self._kept.pop(key, None)
            if y.device.type == "cpu" and self._spill.put(_output(key), y):
                return y  # (on CPU parked in the spill file: the MLP's passes then hold one activation less)
            self._outputs[key] = y
            return y.clone()
        return y


def _output(key: Key) -> Key:
    """The spill's key of a child's kept output (its input's is ``key`` itself)."""
    return key[0], key[1] + " output"


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
