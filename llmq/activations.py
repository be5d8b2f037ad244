"""Calibration activations at the entrance of a decoder layer.

Captured once at layer 0 (with the keyword arguments the model passes its layers:
masks, position ids, rotary embeddings), then carried from layer to layer by
running each quantized layer over them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from llmq.arch import Arch, get_module
from llmq.errors import LlmqError
from llmq.reuse import Reuse
from llmq.source import ModelSource, move_resident, release

Observer = Callable[[torch.Tensor], None]

# Tokens per forward over a layer's calibration windows.  A batch's intermediates (an MLP's are several
# times the hidden width) are the largest transient of a pass: at 8 windows of 2048 tokens a 7B-shaped
# MLP's would take ~3 GB.  4096 tokens keep each product large enough to run at full speed.
BATCH_TOKENS = 4096
MAX_BATCH_WINDOWS = 8


def batch_windows(seqlen: int) -> int:
    """Windows of ``seqlen`` tokens per forward: 8, or fewer when that would exceed BATCH_TOKENS."""
    return max(1, min(MAX_BATCH_WINDOWS, BATCH_TOKENS // max(1, seqlen)))


class _Observed(Exception):
    """Raised inside a forward once every observer has had its input (the rest is not needed)."""


def layer_hidden(out: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers >= 5) or a tuple whose first item is one."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _Watch:
    """The observers' hooks over LayerInputs.run's forwards, and when a forward may stop early.

    Without keep_outputs nothing downstream of the last observed module matters: once every observer has
    seen its input the rest of the forward is skipped (raising _Observed).  That needs each observed module
    to run once per forward, which the first full forward checks; it also notes which modules read the very
    tensor an earlier one read, so that a stopped forward shows it to them.  ``single_call`` keeps what the
    check found, per layer class and module names (the run's, shared by its layers)."""

    def __init__(self, layer: nn.Module, observers: dict[nn.Module, Observer], keep_outputs: bool,
                 single_call: dict[tuple[str, ...], dict[str, str] | None]):
        self.observers = observers
        self.names = {m: n for n, m in layer.named_modules() if m in observers}
        self.modules = {n: m for m, n in self.names.items()}
        self.may_stop = bool(observers) and not keep_outputs
        self.key = (type(layer).__name__, *self.names.values()) if self.may_stop else ()
        self.single_call = single_call
        self.calls: dict[nn.Module, int] = {}
        self.got: dict[str, torch.Tensor] = {}  # this forward's observed inputs
        self.shares: dict[str, str] = {}  # module -> the earlier observed module whose very input tensor it read

    def clear(self) -> None:
        """Forget a forward (before the next; at the end, its observed inputs let go)."""
        self.calls.clear()
        self.got.clear()
        self.shares.clear()

    def pre_hook(self, mod: nn.Module, args: tuple) -> None:
        self.observers[mod](args[0])
        self.calls[mod] = self.calls.get(mod, 0) + 1
        name = self.names[mod]
        same = next((n for n, t in self.got.items() if t is args[0]), None)
        if same is not None:
            self.shares.setdefault(name, same)
        self.got.setdefault(name, args[0])
        known = self.single_call.get(self.key)
        if self.may_stop and known is not None and all(n in self.got for n in self.modules if n not in known):
            for n, source in known.items():  # (they would read the same tensor: show it to them now)
                if n not in self.got:
                    self.observers[self.modules[n]](self.got[source])
            raise _Observed

    def full_forward_done(self) -> None:
        """After a forward that ran to its end: the first one records whether each module ran once."""
        if self.may_stop and self.key not in self.single_call:
            once = len(self.calls) == len(self.observers) and all(n == 1 for n in self.calls.values())
            self.single_call[self.key] = dict(self.shares) if once else None


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one (1, seqlen, hidden) tensor per calibration sample
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Samples per forward call (batch_windows).  Captured kwargs (masks, rotary tables) have batch 1 and broadcast.
    batch_size: int = MAX_BATCH_WINDOWS
    # Index of hidden[0] among all the run's windows (a share of a distributed run starts later); a
    # multiple of batch_size, so batches are numbered alike however the windows are shared out.
    offset: int = 0
    # What passes over ``reuse.layer`` may take from earlier passes (llmq.reuse); None: nothing.
    reuse: Reuse | None = None
    # Per observed module set (by layer class and module names), if each module was seen to run once per
    # forward: which of them read the very tensor an earlier one read (k/v_proj: q_proj's); None if not.
    _single_call: dict[tuple[str, ...], dict[str, str] | None] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def run(self, layer: nn.Module, observers: Mapping[nn.Module, Observer] | None = None,
            keep_outputs: bool = False, on_batch: Callable[[int], None] | None = None,
            consume: bool = False) -> list[torch.Tensor] | None:
        """Forward every sample through ``layer``; ``observers`` see the input of their module, and
        ``on_batch`` the run-wide number of each batch before its forward.  ``consume``: empty ``hidden``
        as the batches are taken (advance).

        Without ``keep_outputs`` nothing downstream of the last observed module matters, so
        once every observer has seen its input the rest of the forward is skipped (true-sequential
        GPTQ's q/k/v pass, for instance, then costs a norm instead of a whole layer: k/v_proj read
        q_proj's very input, so the forward stops as q_proj's comes, and they are shown it then).
        This relies on each observed module running once per forward, which a first full batch
        checks (once per layer class and module names, not once per layer); if it does not, every
        batch runs in full.
        """
        watch = _Watch(layer, dict(observers or {}), keep_outputs, self._single_call)
        batch = 0
        reuse = self.reuse if self.reuse is not None and self.reuse.layer is layer else None
        remove = (reuse.hooks(lambda: batch, self.hidden[0].shape[-1], set(watch.observers))
                  if reuse is not None and self.hidden else None)
        handles = [mod.register_forward_pre_hook(watch.pre_hook) for mod in watch.observers]  # (after reuse's: it keeps first)
        outputs: list[torch.Tensor] = []
        try:
            for i in range(0, len(self.hidden), self.batch_size):
                windows = self.hidden[i : i + self.batch_size]
                x = torch.cat(windows)
                if consume:
                    self.hidden[i : i + self.batch_size] = [None] * len(windows)
                del windows
                batch = (self.offset + i) // self.batch_size
                if on_batch is not None:
                    on_batch(batch)
                watch.clear()
                if reuse is not None:
                    reuse.start_forward()
                try:
                    y = layer_hidden(layer(x, **self.kwargs))
                except _Observed:
                    continue
                if keep_outputs:
                    outputs.extend(y.split(1))
                watch.full_forward_done()
        finally:
            for h in handles:
                h.remove()
            if remove is not None:
                remove()
            watch.clear()  # (let go of the last forward's inputs)
        return outputs if keep_outputs else None

    def first_batch(self) -> torch.Tensor:
        """The samples of the first forward call, as ``run`` batches them (for quick checks)."""
        return torch.cat(self.hidden[: self.batch_size])

    def advance(self, layer: nn.Module) -> None:
        """Replace the inputs by this layer's outputs: they are the next layer's inputs.

        The last pass over the layer: each batch's inputs (and what ``reuse`` kept of them) are let go as
        its outputs come, so the two sets are never both whole in memory."""
        if self.reuse is not None and self.reuse.layer is layer:
            self.reuse.last_pass = True
        self.hidden = list(self.hidden)  # (our own list to empty: another holder of the old one keeps its tensors)
        self.hidden = self.run(layer, keep_outputs=True, consume=True)  # type: ignore[assignment]
        if self.reuse is not None:
            self.reuse.close()
        self.reuse = None


# ---- capture at layer 0 -------------------------------------------------------------

class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0 to record what the model feeds its decoder layers."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict[str, Any] | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden.append(hidden_states)
        if self.kwargs is None:
            self.kwargs = _by_name(self.layer, hidden_states, args, kwargs) if args else kwargs
        raise _StopForward

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the model may read attributes of its layers (e.g. attention_type)
            return getattr(self._modules["layer"], name)


def _by_name(layer: nn.Module, hidden: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments after the hidden states, all as keywords (GPT-2 passes its cache and mask
    positionally): the layer is later called with a batch of hidden states and these."""
    signature = inspect.signature(layer.forward)
    params = signature.parameters
    try:
        bound = signature.bind(hidden, *args, **kwargs)
    except TypeError:
        bound = None
    if bound is None or any(params[k].kind == inspect.Parameter.VAR_POSITIONAL for k in bound.arguments):
        raise LlmqError("cannot name the positional arguments this architecture passes its decoder layers")
    named: dict[str, Any] = {}
    for k, v in list(bound.arguments.items())[1:]:
        if params[k].kind == inspect.Parameter.VAR_KEYWORD:
            named.update(v)
        else:
            named[k] = v
    return named


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def capture_inputs(model: nn.Module, source: ModelSource, arch: Arch, ids: torch.Tensor,
                   dtype: torch.dtype, device: torch.device) -> LayerInputs:
    """Run the calibration tokens up to layer 0 with only the pre-layer weights resident."""
    layers = get_module(model, arch.layers)
    head = model.get_output_embeddings()
    names = _module_names(model)
    head_name = names.get(id(head)) if head is not None else None
    # Everything outside the decoder layers except the output head (big, and not needed yet).
    outside = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()
                      if not n.startswith(arch.layers + ".") and (head_name is None or not n.startswith(head_name + "."))})
    for prefix in outside:
        source.materialize(model, prefix, dtype)
    move_resident(model, device)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    model(input_ids=row[None].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        layers[0] = catcher.layer
        for prefix in outside:
            release(model.get_submodule(prefix))
    kwargs = {k: v for k, v in (catcher.kwargs or {}).items() if k not in ("past_key_values", "past_key_value", "cache")}
    return LayerInputs(hidden=catcher.hidden, kwargs=kwargs, batch_size=batch_windows(ids.shape[-1]))
