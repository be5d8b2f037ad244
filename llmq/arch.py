"""Declarative descriptions of decoder architectures.

Each family is a small table: where the decoder layers live, and which linears of a
layer read the same input, in the order the layer computes them.  The order is what
"true-sequential" quantization follows (q/k/v -> o -> gate/up -> down): each group is
calibrated on inputs produced by the already-quantized groups before it.
Unknown families fall back to a discovered layer list whose groups, order and norm folds are
traced from one forward of the first layer (trace_arch); where tracing cannot tell, every linear
stays in one group, which is always correct, just not sequential.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmq.errors import LlmqError
from llmq.experts import ExpertLinears


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that share one input, and the op whose output channels can absorb a scale.

    ``prev`` is a norm or a linear inside the layer; ``block`` is the sub-module whose
    output is compared when searching scales (AWQ).  Only pairs where x -> prev(x)/s
    commutes with everything between prev and the linears belong here (a norm's affine
    weight, a linear feeding attention values or a gated product, ReLU), never through GELU.
    """

    prev: str
    linears: tuple[str, ...]
    block: str


@dataclass(frozen=True)
class Arch:
    layers: str  # dotted path to the nn.ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]  # linear names relative to a layer, grouped by shared input
    scaling: tuple[ScaleGroup, ...] = ()
    discovered: bool = False  # no table: wiring still to be traced on a real layer (see trace_arch)

    def linears(self) -> list[str]:
        return [name for group in self.sequential for name in group]


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_V_TO_O = ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj")
_UP_TO_DOWN = ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")  # act(gate) * (up / s): exact


def _pre_norm(attn_norm: str = "input_layernorm", mlp_norm: str = "post_attention_layernorm",
              mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj"), down: str = "mlp.down_proj",
              up_to_down: bool = True) -> Arch:
    """The Llama shape: norm -> attention, norm -> MLP, each added to the residual stream.

    ``up_to_down`` only where the MLP's output is linear in up_proj's (a gated product);
    a scale cannot pass through a plain activation (GELU, ReLU^2, xIELU) on the way to down_proj.
    """
    return Arch(
        layers="model.layers",
        sequential=(_ATTN, ("self_attn.o_proj",), mlp_in, (down,)),
        scaling=(
            ScaleGroup(attn_norm, _ATTN, "self_attn"),
            _V_TO_O,
            ScaleGroup(mlp_norm, mlp_in, "mlp"),
            *((_UP_TO_DOWN,) if up_to_down else ()),
        ),
    )


_LLAMA = _pre_norm()

# Gemma 2/3 normalise the attention output too (post_attention_layernorm, before the residual add):
# the MLP's input norm is pre_feedforward_layernorm.
_GEMMA2 = _pre_norm(mlp_norm="pre_feedforward_layernorm")

# OLMo 2/3 and EXAONE 4 normalise sub-block outputs only: the residual stream itself feeds q/k/v
# and gate/up, so no norm can absorb their scales.
_POST_NORM = Arch(
    layers="model.layers",
    sequential=(_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    scaling=(_V_TO_O, _UP_TO_DOWN),
)

# Cohere runs attention and MLP in parallel off one layernorm: no single block sees its output.
_COHERE = Arch(
    layers="model.layers",
    sequential=((*_ATTN, "mlp.gate_proj", "mlp.up_proj"), ("self_attn.o_proj",), ("mlp.down_proj",)),
    scaling=(_V_TO_O, _UP_TO_DOWN),
)

# GLM and GLM-4: fused gate_up_proj (its "up" half cannot be scaled alone, so no fold into down_proj).
_GLM = _pre_norm(mlp_in=("mlp.gate_up_proj",), up_to_down=False)

_OPT = Arch(
    layers="model.decoder.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    scaling=(
        ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
        ScaleGroup("fc1", ("fc2",), "fc2"),  # ReLU(x / s) = ReLU(x) / s for s > 0: the fold is exact
    ),
)

_NEOX = Arch(
    layers="gpt_neox.layers",
    sequential=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    scaling=(
        ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
        ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
        # No dense_h_to_4h -> dense_4h_to_h: a scale cannot pass through the GELU between them.
    ),
)

_PHI3 = Arch(
    layers="model.layers",
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    scaling=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ),
)

# Phi(-2) runs attention and MLP in parallel off one layernorm.
_PHI = Arch(
    layers="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"),
        ("self_attn.dense",),
        ("mlp.fc2",),
    ),
    scaling=(
        ScaleGroup("self_attn.v_proj", ("self_attn.dense",), "self_attn.dense"),
        # No fc1 -> fc2 (GELU in between), no layernorm group (it feeds attention and MLP at once).
    ),
)

# GPT-2: fused c_attn, GELU MLP (its Conv1D modules are read as nn.Linear, see source.py).
_GPT2 = Arch(
    layers="transformer.h",
    sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    scaling=(ScaleGroup("ln_1", ("attn.c_attn",), "attn"), ScaleGroup("ln_2", ("mlp.c_fc",), "mlp")),
)

ARCHS: dict[str, Arch] = {
    **dict.fromkeys(["llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "olmo", "granite", "helium",
                     "smollm3", "seed_oss", "hunyuan_v1_dense", "stablelm"], _LLAMA),
    **dict.fromkeys(["gemma2", "gemma3_text"], _GEMMA2),
    **dict.fromkeys(["olmo2", "olmo3", "exaone4"], _POST_NORM),
    **dict.fromkeys(["cohere", "cohere2"], _COHERE),
    **dict.fromkeys(["glm", "glm4"], _GLM),
    # ReLU^2 (Arcee) and xIELU (Apertus) MLPs have no gate: up_proj feeds an activation.
    "arcee": _pre_norm(mlp_in=("mlp.up_proj",), up_to_down=False),
    "apertus": _pre_norm("attention_layernorm", "feedforward_layernorm", mlp_in=("mlp.up_proj",), up_to_down=False),
    "starcoder2": _pre_norm(mlp_in=("mlp.c_fc",), down="mlp.c_proj", up_to_down=False),
    "opt": _OPT,
    "gpt_neox": _NEOX,
    "phi3": _PHI3,
    "phi": _PHI,
    "gpt2": _GPT2,
}


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def arch_for(model: nn.Module) -> Arch:
    """The table for this model, or a discovered fallback for unknown families."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in ARCHS:
        arch = ARCHS[model_type]
        try:
            layers = get_module(model, arch.layers)
            first = layers[0]
            for name in arch.linears():
                first.get_submodule(name)
        except (AttributeError, IndexError):
            pass  # this checkpoint's module names differ from the table: discover instead
        else:
            return arch
    return _discover(model)


def _discover(model: nn.Module) -> Arch:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    if not candidates:
        raise LlmqError(f"cannot find the decoder layers of model type {getattr(model.config, 'model_type', '?')!r}")
    name, layers = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    linears = layer_linears(layers[0])
    if not linears:
        raise LlmqError(f"the decoder layers of model type {model.config.model_type!r} contain no nn.Linear to quantize")
    # One group: every linear sees inputs from the unquantized layer, which is valid for any wiring.
    # trace_arch refines it once a layer with real weights and inputs is at hand.
    return Arch(layers=name, sequential=(linears,), discovered=True)


def decoder_linears(model: nn.Module, arch: Arch | None = None) -> dict[str, nn.Linear]:
    """Every decoder linear a run quantizes (before skip patterns), by full module name: the table's in
    every layer, or each layer's own for families without one (whose layers may differ: dense first
    layers, then mixture-of-experts ones)."""
    arch = arch or arch_for(model)
    found = {}
    for i, layer in enumerate(get_module(model, arch.layers)):
        for name in layer_linears(layer) if arch.discovered else arch.linears():
            found[f"{arch.layers}.{i}.{name}"] = layer.get_submodule(name)
    return found


def layer_linears(layer: nn.Module) -> tuple[str, ...]:
    """The linears of a layer worth quantizing, for families without a table.

    A linear to a single output is a gate scalar (Qwen2-MoE's shared_expert_gate): it holds no
    weight worth the saving, and runtimes build it as a plain float linear."""
    return tuple(n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and m.out_features > 1)


def first_param(module: nn.Module) -> str | None:
    """The name of a module's first forward argument (what a block is handed as a keyword, say)."""
    return next(iter(inspect.signature(module.forward).parameters), None)


def _first_input(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get(first_param(module))


@torch.no_grad()
def trace_arch(arch: Arch, layer: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> Arch:
    """Describe an untabled family's layer by watching one forward of it.

    Linears handed the very same tensor share an input (a group); groups in the order they first
    run give the true-sequential order.  A group whose input is the output of a norm (a module
    with a per-channel weight of that width) becomes an AWQ scaling group, provided some
    sub-module takes that tensor as its first input and contains the whole group (the block
    whose output the scale search compares).  Linear -> linear folds (v -> o, up -> down) hold
    only through ops known to be linear, which a trace cannot tell, so none are proposed.  AWQ
    still checks every proposed fold numerically before using it (methods/awq.py: commutes).
    """
    names = {m: n for n, m in layer.named_modules()}
    linear_in: dict[str, torch.Tensor] = {}  # first input of each linear, in call order
    first_in: dict[str, Any] = {}  # first input of every sub-module
    out_of: list[tuple[str, Any]] = []  # outputs of every sub-module

    def pre(mod, args, kw):
        n = names[mod]
        if n and n not in first_in:
            first_in[n] = _first_input(mod, args, kw)
            if isinstance(mod, nn.Linear):
                linear_in[n] = first_in[n]

    def post(mod, _args, out):
        if names[mod]:
            out_of.append((names[mod], out))

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in layer.modules()]
    handles += [m.register_forward_hook(post) for m in layer.modules()]
    try:
        layer(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    wanted = set(arch.linears())
    groups: list[list[str]] = []
    for n, t in linear_in.items():
        if n not in wanted:
            continue
        g = next((g for g in groups if linear_in[g[0]] is t), None)
        groups.append([n]) if g is None else g.append(n)
    groups = _merge_experts(layer, groups, wanted)
    if {n for g in groups for n in g} != wanted:  # a linear that never ran: keep the safe one-group description
        return dataclasses.replace(arch, discovered=False)  # (traced: not to be traced again)

    scaling = []
    for g in groups:
        t = linear_in[g[0]]
        width = layer.get_submodule(g[0]).in_features
        prev = next((n for n, o in out_of if o is t and not isinstance(layer.get_submodule(n), nn.Linear)
                     and isinstance(getattr(layer.get_submodule(n), "weight", None), torch.Tensor)
                     and layer.get_submodule(n).weight.shape == (width,)), None)
        # (a lone linear may be its own block, as OPT's fc1 is)
        blocks = [b for b, i in first_in.items() if i is t and all(n == b or n.startswith(b + ".") for n in g)
                  and (g == [b] or not isinstance(layer.get_submodule(b), nn.Linear))]
        if prev is not None and blocks:
            block = min(blocks, key=len)  # the outermost: the search then judges what the block computes
            scaling.append(ScaleGroup(prev, tuple(g), block))
    return Arch(layers=arch.layers, sequential=tuple(tuple(g) for g in groups), scaling=tuple(scaling))


def _expert_role(layer: nn.Module, name: str) -> str | None:
    """``mlp.experts.*.up_proj`` for ``mlp.experts.3.up_proj``: the same projection in every expert."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i + 1].isdigit() and isinstance(layer.get_submodule(".".join(parts[: i + 1])), ExpertLinears):
            return ".".join(parts[: i + 1] + ["*"] + parts[i + 2 :])
    return None


def _merge_experts(layer: nn.Module, groups: list[list[str]], wanted: set[str]) -> list[list[str]]:
    """One step per projection role across all experts instead of one per expert.

    Experts run one after another, so a trace sees e0.gate/up, e0.down, e1.gate/up, ...; but no
    expert reads another's output, so every expert's gate/up can be calibrated in one forward and
    every down_proj in the next, which keeps the order true-sequential for each expert.  Experts the
    traced batch routed no token to join their role's step."""
    role = {n: _expert_role(layer, n) for n in wanted}
    merged: list[list[str]] = []
    by_role: dict[frozenset, list[str]] = {}
    for g in groups:
        key = frozenset(role[n] for n in g)
        if None in key:
            merged.append(list(g))
        elif key in by_role:
            by_role[key].extend(g)
        else:
            by_role[key] = list(g)
            merged.append(by_role[key])
    placed = {n for g in merged for n in g}
    for n in sorted(wanted - placed):
        home = next((g for key, g in by_role.items() if role[n] in key), None)
        if home is not None:
            home.append(n)
    return merged
