"""Mixture-of-experts blocks as one nn.Linear per expert projection.

transformers (5.x) keeps a MoE layer's experts as two 3-D parameters, ``gate_up_proj``
[E, 2I, H] and ``down_proj`` [E, H, I], merged on load from the per-expert tensors the
checkpoints store (``experts.{e}.gate_proj.weight`` etc., Mixtral's ``w1/w3/w2``).  llmq
swaps such a module for :class:`ExpertLinears`, which holds those per-expert tensors as
ordinary linears under their checkpoint names and computes the same thing.  Then:

- each expert's Hessian is accumulated by the same hooks as any linear, from exactly the
  tokens the router sends it;
- every method and format handles the experts as plain linears, and the exports carry the
  per-expert names that vLLM, GPTQModel and llm-compressor checkpoints use.

Only the experts modules whose eager forward is transformers' standard one (routed tokens
-> act(gate) * up -> down -> times the routing weight, summed) are swapped; the swap is
decided from the class's own source, not from a list of families.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from llmq.errors import LlmqError


@dataclass(frozen=True)
class ExpertNames:
    """Checkpoint names of one expert's projections (relative to ``experts.{e}``)."""

    gate: str
    up: str
    down: str


class Expert(nn.Module):
    """One expert's three projections, registered under its checkpoint names."""

    def __init__(self, names: ExpertNames, hidden: int, inter: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.names = names
        self.add_module(names.gate, nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device))
        self.add_module(names.up, nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device))
        self.add_module(names.down, nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device))

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        n = self.names
        return getattr(self, n.gate), getattr(self, n.up), getattr(self, n.down)


class ExpertLinears(nn.ModuleList):
    """A drop-in for transformers' fused experts module: same call, per-expert linears."""

    def __init__(self, fused: nn.Module, names: ExpertNames):
        num, two_inter, hidden = fused.gate_up_proj.shape
        dtype, device = fused.gate_up_proj.dtype, fused.gate_up_proj.device
        super().__init__(Expert(names, hidden, two_inter // 2, dtype, device) for _ in range(num))
        self._act = (fused.act_fn,)  # in a tuple: a registered child would count as an expert
        self.num_experts = num

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue  # (routers may mark dropped slots with an out-of-range index)
            slot, token = torch.where(top_k_index.T == e)  # transformers' order: the sums match bit for bit
            x = hidden_states[token]
            # gate and up read the very same tensor: one Hessian serves both (methods/gptq.py)
            gate, up, down = self[e].projections()
            y = down(self._act[0](gate(x)) * up(x)) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _forward_source(cls: type) -> str | None:
    fn = getattr(cls.forward, "__wrapped__", cls.forward)  # transformers' use_experts_implementation wraps it
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    body = src[src.index(":\n", src.index(")")) + 2 :] if ")" in src else src  # after the signature line(s)
    body = re.sub(r'"""(.*?)"""', "", body, flags=re.S)
    return re.sub(r"\s+", " ", body).strip()


def _standard_forward() -> str | None:
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    return _forward_source(MixtralExperts)


def _is_standard(mod: nn.Module, reference: str | None) -> bool:
    params = dict(mod.named_parameters(recurse=False))
    act = getattr(mod, "act_fn", None)
    if set(params) != {"gate_up_proj", "down_proj"} or any(c is not act for c in mod.children()):
        return False
    gu, d = params["gate_up_proj"], params["down_proj"]
    if gu.dim() != 3 or d.dim() != 3 or gu.shape[0] != d.shape[0] or gu.shape[1] != 2 * d.shape[2] or gu.shape[2] != d.shape[1]:
        return False
    layout = dict(is_transposed=False, has_bias=False, has_gate=True, is_concatenated=True, has_post_expert_norm=False)
    if any(getattr(mod, k, v) != v for k, v in layout.items()) or act is None:
        return False
    return reference is not None and _forward_source(type(mod)) == reference


def _expert_names(model: nn.Module) -> ExpertNames | None:
    """The per-expert checkpoint names, from transformers' own merge rule for this model."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

        transforms = get_model_conversion_mapping(model)
    except Exception:
        return None
    gate_up = down = None
    for t in transforms:
        if not isinstance(t, WeightConverter):
            continue
        targets = t.target_patterns if isinstance(t.target_patterns, list) else [t.target_patterns]
        sources = t.source_patterns if isinstance(t.source_patterns, list) else [t.source_patterns]
        ops = [type(o) for o in t.operations]
        names = [re.fullmatch(r".*experts\.\*\.(\w+)\.weight", s) for s in sources]
        if len(targets) != 1 or not all(names):
            continue
        if targets[0].endswith("experts.gate_up_proj") and ops == [MergeModulelist, Concatenate] and len(names) == 2:
            gate_up = (names[0].group(1), names[1].group(1))
        elif targets[0].endswith("experts.down_proj") and ops == [MergeModulelist] and len(names) == 1:
            down = names[0].group(1)
    if gate_up is None or down is None:
        return None
    return ExpertNames(gate_up[0], gate_up[1], down)


def unfuse_experts(model: nn.Module) -> int:
    """Swap every standard fused experts module for :class:`ExpertLinears`; returns how many.

    A module that holds fused expert weights but is not standard (biases, transposed or
    interleaved layouts, another forward) is refused: quantizing it would need its own code."""
    fused = [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter)
             and getattr(m, "gate_up_proj").dim() == 3]
    if not fused:
        return 0
    kind = type(fused[0][1]).__name__
    names = _expert_names(model)
    reference = _standard_forward()
    if names is None or not all(_is_standard(m, reference) for _, m in fused):
        raise LlmqError(f"the mixture-of-experts layers of model type {getattr(model.config, 'model_type', '?')!r} "
                        f"({kind}) are not in the standard layout llmq quantizes")
    for name, mod in fused:
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, ExpertLinears(mod, names))
    return len(fused)
