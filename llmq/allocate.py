"""Bit allocation to a size budget: each linear's grid (and a GGUF file's embedding and head types) chosen
from measured sensitivity, so that the whole weight file fits the budget at the least predicted error.

    probe   one streaming pass over the float model.  In each decoder layer every unit (linears that
            runtimes fuse, q/k/v and gate/up, share a grid; a GGUF tensor stands alone) is quantized alone
            on each candidate grid by the run's method, from its inputs' Hessian, and the change this
            makes to the layer's output is priced by the KL divergence it causes when carried unchanged
            to the final norm and head (the "logit lens").  The embedding's error enters at layer 0, the
            head's at the output.
    solve   a multiple-choice knapsack: one candidate per unit, least total predicted KL (the units'
            KLs added), bytes within the budget (dynamic programming over bytes, then a greedy fill of
            what the rounding left).
    emit    one rule per unit naming its modules exactly, ahead of the user's rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmq.activations import LayerInputs, capture_inputs
from llmq.arch import Arch, arch_for, decoder_linears, get_module
from llmq.dtypes import nbytes as dtype_nbytes
from llmq.errors import LlmqError
from llmq.formats import FORMATS
from llmq.gguf.plan import GGUFPlan, tensor_namer
from llmq.gguf.model import gguf_config
from llmq.gguf.types import BLOCK_TYPES, FLOAT_TYPES, NARROW_ALLOCATION_TYPES
from llmq.gguf.writer import file_bytes
from llmq.grid import Grid, IntGrid
from llmq.methods import Method
from llmq.methods.gptq import InputHessians
from llmq.plan import RunPlan, head_grid, quantizable_head
from llmq.rounding import rtn_quantize
from llmq.rules import Rule, first_match
from llmq.source import ModelSource, move_resident, release

# A safetensors header entry, "NAME":{"dtype":"BF16","shape":[A,B],"data_offsets":[S,E]}, is at most this
# plus the name, the shape's digits and the offsets' digits; a shard adds its length prefix, metadata and padding.
HEADER_ENTRY_BYTES = 52
SHARD_FRAME_BYTES = 64
PROBE_SAMPLES = 32  # calibration windows whose Hessians the probes quantize with
LENS_TOKENS = 2048  # tokens (whole windows, at least one) each probe's error is measured on
FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")
DP_STEPS = 20000  # byte resolution of the knapsack: budget / DP_STEPS


@dataclass(frozen=True)
class Candidate:
    label: str  # "int3 g128", a GGUF type, "float"
    grid: Grid | None  # None: left in float
    rule: dict[str, Any]  # what a rule choosing it sets (match left out)


@dataclass
class Unit:
    """Modules that get one candidate together."""

    modules: tuple[str, ...]  # full module names
    layer: int | None  # decoder layer, None for the embedding and the head
    options: list[Candidate]
    bytes: list[int]
    error: list[float] = field(default_factory=list)  # predicted KL per token (nats) of each option


@dataclass
class Allocation:
    budget: int
    fixed_bytes: int  # what no unit holds: norms, embeddings and head of checkpoint formats, user-ruled modules
    units: list[Unit]
    choice: list[int]
    in_nats: bool  # False: the head was not found, errors are squared sizes (comparable with each other only)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + sum(u.bytes[c] for u, c in zip(self.units, self.choice))

    @property
    def predicted_kl(self) -> float | None:
        return sum(u.error[c] for u, c in zip(self.units, self.choice)) if self.in_nats else None

    def rules(self) -> tuple[Rule, ...]:
        return tuple(Rule(match=_exact(u.modules), **u.options[c].rule) for u, c in zip(self.units, self.choice))

    def table(self) -> list[dict[str, Any]]:
        """One row per unit: what it got, its bytes and its predicted KL (or error)."""
        key = "predicted_kl" if self.in_nats else "error"
        return [{"layer": u.layer, "modules": _short(u.modules), "choice": u.options[c].label, "bytes": u.bytes[c],
                 key: u.error[c]} for u, c in zip(self.units, self.choice)]

    def render(self) -> str:
        """The plan for the terminal: one row per decoder layer, a column per unit (then embedding and head)."""
        rows: dict[Any, dict[str, str]] = {}
        for u, c in zip(self.units, self.choice):
            rows.setdefault(u.layer, {})[_short(u.modules).rsplit(".", 1)[-1]] = u.options[c].label
        cols = list(dict.fromkeys(k for r in rows.values() for k in r))
        lines = ["| layer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for layer, r in rows.items():
            lines.append(f"| {'-' if layer is None else layer} | " + " | ".join(r.get(c, "") for c in cols) + " |")
        kl = f", predicted KL {self.predicted_kl:.3g} nats/token" if self.in_nats else ""
        lines.append(f"allocation: {self.total_bytes:,} of {self.budget:,} bytes planned{kl}")
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "planned_bytes": self.total_bytes, "predicted_kl": self.predicted_kl,
                "units": self.table()}


def budget_bytes(target_size: int | None, target_bpw: float | None, n_params: int) -> int:
    return target_size if target_size is not None else int(target_bpw * n_params / 8)


def allocate(source: ModelSource, plan: RunPlan, model: nn.Module, method: Method, ids: torch.Tensor,
             budget: int, device: torch.device, recipe: dict[str, Any], progress: bool = True) -> Allocation:
    """The allocation of ``budget`` bytes for ``plan`` on ``model`` (a skeleton), probing with ``ids``.
    ``recipe``: what the file records of the run (a GGUF file's header holds it, so it counts in the size)."""
    arch = arch_for(model)
    sizing = GGUFSizing(source, plan, model, recipe) if plan.gguf is not None else CheckpointSizing(source, plan, model)
    units = sizing.units(arch)
    if not units:
        raise LlmqError("nothing left to allocate: the rules and --skip fix every module")
    fixed = sizing.fixed_bytes(units)
    least = fixed + sum(min(u.bytes) for u in units)
    if least > budget:
        raise LlmqError(f"the budget of {budget:,} bytes is below the smallest file these candidates make "
                        f"({least:,} bytes); raise it or allow fewer bits")
    in_nats = probe(source, plan, model, arch, method, ids[:PROBE_SAMPLES], units, device, progress)
    return Allocation(budget, fixed, units, solve(units, budget - fixed), in_nats)


# ---- sizes and candidates ------------------------------------------------------------------------

class CheckpointSizing:
    """Bytes of a safetensors checkpoint: packed linears at their format's size, the rest in the dtype, and
    each tensor's header entry bounded above (its name, dtype, shape and offsets as JSON)."""

    def __init__(self, source: ModelSource, plan: RunPlan, model: nn.Module):
        self.source, self.plan, self.model = source, plan, model
        self.fmt = FORMATS[plan.format]
        self.float_bytes = dtype_nbytes(plan.dtype)
        limit = min(plan.max_shard_bytes, sum(p.numel() for p in model.parameters()) * 4)
        self.entry_bytes = HEADER_ENTRY_BYTES + 2 * len(str(limit))  # (+ name and shape)

    def candidates(self, width: int) -> list[Candidate]:
        base = self.plan.grid
        groups = sorted({g for g in (*self.plan.allocate_group_sizes, base.group_size) if g == -1 or width % g == 0},
                        key=lambda g: g if g > 0 else 1 << 30)
        out = [Candidate(f"int{b} g{g if g > 0 else 'channel'}", dataclasses.replace(base, bits=b, group_size=g), {"bits": b, "group_size": g})
               for b in self.plan.allocate_bits for g in groups]
        return out + [Candidate("float", None, {"keep": True})]

    def module_bytes(self, module: str, lin: nn.Linear, grid: Grid | None) -> int:
        """The linear's tensors and their header entries."""
        key = self.source.module_key(module)
        shape = 2 * len(str(max(lin.in_features, lin.out_features)))
        if grid is None:
            return lin.weight.numel() * self.float_bytes + self.entry_bytes + len(key) + 7 + shape
        entries = sum(self.entry_bytes + len(key) + 1 + len(s) + shape for s in self.fmt.packed_suffixes(grid))
        return self.fmt.nbytes(lin.out_features, lin.in_features, grid) + entries

    def units(self, arch: Arch) -> list[Unit]:
        """Linears runtimes fuse (q/k/v, gate/up: the arch's groups) share a grid; each other linear, and an
        untied head the format packs (gptq), is a unit of its own."""
        linears = decoder_linears(self.model, arch)
        free = {n for n in linears if _free(self.plan, n)}
        head = quantizable_head(self.plan, self.model)
        if head is not None and first_match(self.plan.rules, head) is None and final_norm(self.model) is not None:
            linears[head] = self.model.get_submodule(head)
            free.add(head)
        groups = [[f"{arch.layers}.{i}.{n}" for n in g] for i in range(len(get_module(self.model, arch.layers)))
                  for g in (arch.sequential if not arch.discovered else [])] or [[n] for n in linears if n != head]
        groups += [[head]] if head in free else []
        units = []
        for group in groups:
            names = tuple(n for n in group if n in free)
            if not names:
                continue
            width = math.gcd(*(linears[n].in_features for n in names))
            cands = self.candidates(width)
            units.append(Unit(names, _layer_of(names[0], arch), cands,
                              [sum(self.module_bytes(n, linears[n], c.grid) for n in names) for c in cands]))
        return units

    def fixed_bytes(self, units: list[Unit]) -> int:
        """Every tensor outside the units at its plan's size, with its header entry; each shard's header frame."""
        in_units = {n for u in units for n in u.modules}
        linears = decoder_linears(self.model)
        head = quantizable_head(self.plan, self.model)
        head_ruled = head_grid(self.plan, self.model)
        total = 0
        for name, p in self.model.named_parameters():
            module = name.removesuffix(".weight")
            if name in self.source.tied or module in in_units:
                continue
            if (module in linears or module == head) and name.endswith(".weight"):
                grid = self.plan.grid_of(module) if module in linears else head_ruled(name)
                total += self.module_bytes(module, linears.get(module) or self.model.get_submodule(module), grid)
            else:
                key = self.source.checkpoint_key(name) or name
                total += p.numel() * self.float_bytes + self.entry_bytes + len(key) + 2 * len(str(max(p.shape)))
        shards = 1 + total // max(1, self.plan.max_shard_bytes)
        return total + shards * SHARD_FRAME_BYTES


class GGUFSizing:
    """Bytes of a GGUF file, exactly: the header as the sink writes it, each tensor at its type's block size."""

    def __init__(self, source: ModelSource, plan: RunPlan, model: nn.Module, recipe: dict[str, Any]):
        self.source, self.plan, self.model, self.recipe = source, plan, model, recipe
        cfg = gguf_config(source.config)
        self.namer = tensor_namer(cfg)
        tied = bool(getattr(source.config, "tie_word_embeddings", False))
        self.gplan = GGUFPlan(plan.gguf.file_type, cfg["num_hidden_layers"], has_output=not tied,
                              token_embd_type=plan.gguf.token_embedding, output_type=plan.gguf.output)

    def gguf_name(self, module: str) -> str:
        key = self.source.checkpoint_key(f"{module}.weight") or f"{module}.weight"
        return self.namer(key) or key

    def candidates(self, width: int) -> list[Candidate]:
        types = [t for t in self.plan.allocate_gguf_types if BLOCK_TYPES[t].fits(width)] \
            or [t for t in NARROW_ALLOCATION_TYPES if BLOCK_TYPES[t].fits(width)]
        return [Candidate(t, BLOCK_TYPES[t], {"type": t}) for t in types] + [Candidate("F16", None, {"type": "F16"})]

    def units(self, arch: Arch) -> list[Unit]:
        """One unit per GGUF tensor: each linear (all experts of one projection together), and the
        embedding and head, when no rule or --gguf-*-type fixes them."""
        by_tensor: dict[str, list[str]] = {}
        for name, p in self.model.named_parameters():
            module = name.removesuffix(".weight")
            if p.dim() == 2 and name.endswith(".weight") and name not in self.source.tied and _free(self.plan, module, gguf=True):
                by_tensor.setdefault(self.gguf_name(module), []).append(module)
        units = []
        for gname, modules in by_tensor.items():
            if not gname.startswith("blk.") and not (self._head_or_embedding_free(gname) and final_norm(self.model)):
                continue
            shape = self.stored_shape(modules)
            cands = self.candidates(shape[-1])
            units.append(Unit(tuple(modules), _layer_of(modules[0], arch), cands, [_gguf_bytes(c.label, shape) for c in cands]))
        return units

    def stored_shape(self, modules: list[str] | tuple[str, ...]) -> tuple[int, ...]:
        """The shape of the GGUF tensor holding these modules' weights (experts stacked)."""
        shape = tuple(self.model.get_submodule(modules[0]).weight.shape)
        return (len(modules), *shape) if len(modules) > 1 else shape

    def _head_or_embedding_free(self, gname: str) -> bool:
        """Whether no flag fixes its type (the probes price both through the head, so it must be found)."""
        if gname == "output.weight":
            return self.plan.gguf.output is None
        return gname == "token_embd.weight" and self.plan.gguf.token_embedding is None

    def fixed_bytes(self, units: list[Unit]) -> int:
        """The file's bytes outside the units' tensor data: header, norms, and the tensors rules fix."""
        chosen = {self.gguf_name(u.modules[0]) for u in units}
        rule_types = {self.gguf_name(n.removesuffix(".weight")): _rule_type(self.plan, n.removesuffix(".weight"), self.gplan)
                      for n, p in self.model.named_parameters() if p.dim() == 2}

        def type_of(gname: str, shape: tuple[int, ...]) -> str:
            return "F32" if gname in chosen else self.gplan.tensor_type(gname, shape, rule_types.get(gname))[0]

        as_f32 = sum(_gguf_bytes("F32", self.stored_shape(u.modules)) for u in units)
        return file_bytes(self.source, self.model, self.plan.gguf.file_type, type_of, self.recipe) - as_f32


def _gguf_bytes(t: str, shape: tuple[int, ...]) -> int:
    return _aligned32(BLOCK_TYPES[t].nbytes(shape) if t in BLOCK_TYPES else math.prod(shape) * FLOAT_TYPES[t].itemsize)


def _aligned32(n: int) -> int:
    return n + (-n) % 32


def _free(plan: RunPlan, module: str, gguf: bool = False) -> bool:
    """Whether the allocation may choose for this module: no user rule and (checkpoints) no --skip names it."""
    if first_match(plan.rules, module) is not None:
        return False
    return gguf or plan.grid_of(module) is not None


def _rule_type(plan: RunPlan, module: str, gplan: GGUFPlan) -> str | None:
    rule = first_match(plan.rules, module)
    if rule is None:
        return None
    return ("F16" if gplan.quantized else gplan.file_type) if rule.keep else rule.type


def _layer_of(module: str, arch: Arch) -> int | None:
    m = re.match(re.escape(arch.layers) + r"\.(\d+)\.", module)
    return int(m[1]) if m else None


def _exact(modules: tuple[str, ...]) -> str:
    return "^(?:" + "|".join(re.escape(m) for m in modules) + ")$"


def _short(modules: tuple[str, ...]) -> str:
    tails = [m.rsplit(".", 1)[-1] for m in modules]
    return modules[0] if len(modules) == 1 else f"{modules[0].rsplit('.', 1)[0]}.{{{','.join(dict.fromkeys(tails))}}}"


# ---- probes ----------------------------------------------------------------------------------------

@torch.no_grad()
def probe(source: ModelSource, plan: RunPlan, model: nn.Module, arch: Arch, method: Method, ids: torch.Tensor,
          units: list[Unit], device: torch.device, progress: bool) -> bool:
    """Fill every unit's ``error``.  Returns whether the errors are in nats (the head was found), else they
    are squared errors of the residual stream, comparable with each other only."""
    dtype = plan.compute_dtype
    inputs = capture_inputs(model, source, arch, ids, dtype, device)
    layers = get_module(model, arch.layers)
    head = _Head(model, source, dtype, device)
    lens_windows = max(1, min(len(ids), LENS_TOKENS // ids.shape[1]))
    bar = tqdm(total=sum(len(u.options) for u in units), desc="probe", unit="probe", disable=not progress, dynamic_ncols=True)
    for i in range(len(layers)):
        prefix = f"{arch.layers}.{i}"
        bar.set_postfix_str(f"layer {i + 1}/{len(layers)}")
        layer = source.materialize(model, prefix, dtype)
        move_resident(layer, device)
        here = [u for u in units if u.layer == i]
        modules = {n: layer.get_submodule(n.removeprefix(prefix + ".")) for u in here for n in u.modules}
        hessians = InputHessians(modules)
        ref = inputs.run(layer, hessians.observers(), keep_outputs=True)  # (all windows: the next layer's inputs)
        hessians.release()
        lens_inputs = LayerInputs(inputs.hidden[:lens_windows], inputs.kwargs, inputs.batch_size)
        measure = head.measure(ref[:lens_windows])
        for u in here:
            _probe_unit(u, modules, hessians, method, lambda: measure(lens_inputs.run(layer, keep_outputs=True)))
            bar.update(len(u.options))
        inputs.hidden = ref
        release(layer)
    for u in (u for u in units if u.layer is None):
        _probe_outside(u, model, source, head, ids, inputs.hidden[:lens_windows])
        bar.update(len(u.options))
    head.release()
    bar.close()
    return head.ready


def _probe_unit(u: Unit, modules: dict[str, nn.Linear], hessians: InputHessians, method: Method,
                run: Callable[[], float]) -> None:
    """Each candidate of one unit: the error it causes, quantized alone with the rest of the layer float."""
    saved = {n: modules[n].weight.data for n in u.modules}
    u.error = []
    for cand in u.options:
        if cand.grid is None:
            u.error.append(0.0)
            continue
        for n in u.modules:
            w = saved[n]
            qt = method.quantize_alone(w, hessians[n].H.to(w.device), cand.grid)
            modules[n].weight.data = qt.dequantize(w.dtype).to(w.device)
        u.error.append(run())
        for n in u.modules:
            modules[n].weight.data = saved[n]


def _probe_outside(u: Unit, model: nn.Module, source: ModelSource, head: "_Head", ids: torch.Tensor,
                   final: list[torch.Tensor]) -> None:
    """The embedding or the head (GGUF), rounded to nearest as the pipeline rounds them.  An embedding's
    error enters the residual stream at layer 0 and is measured there; a head's at the output; a tied
    one's at both, added."""
    module = model.get_submodule(u.modules[0])
    is_emb = module is model.get_input_embeddings()
    is_head = not is_emb or tied_head(model)
    w = source.load_like(f"{u.modules[0]}.weight", module.weight).float()
    windows = ids[: len(final)]
    measure_emb = head.measure([F.embedding(r[None], w).to(final[0]) for r in windows]) if is_emb else None
    measure_head = head.measure(final) if is_head else None
    u.error = []
    for cand in u.options:
        q = w if cand.grid is None else _round(w, cand.grid)
        err = measure_emb([F.embedding(r[None], q).to(final[0]) for r in windows]) if is_emb else 0.0
        u.error.append(err + (measure_head(final, weight=q) if is_head else 0.0))


def tied_head(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _round(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    return rtn_quantize(w, grid).dequantize(torch.float32)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm between the last decoder layer and the head, by the names the families use."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return next((getattr(decoder, n) for n in FINAL_NORMS if isinstance(getattr(decoder, n, None), nn.Module)), None)


class _Head:
    """The final norm and the output head, read once: an error anywhere in the residual stream is priced
    by the KL divergence it causes when it reaches the head unchanged ("logit lens").  Measured against
    the true end-to-end KL this ranks errors far better than their squared size, which misses both
    the directions the head ignores and those it amplifies.  ``ready`` is False for a model whose final
    norm llmq cannot find by name; errors are then squared sizes."""

    def __init__(self, model: nn.Module, source: ModelSource, dtype: torch.dtype, device: torch.device):
        names = {id(m): n for n, m in model.named_modules()}
        head, norm = model.get_output_embeddings(), final_norm(model)
        self.ready = head is not None and norm is not None
        self.prefixes: list[str] = []
        if self.ready:
            weight = f"{names[id(head)]}.weight"
            owner = source.tied.get(weight, weight).removesuffix(".weight")  # a tied head reads the embedding
            self.prefixes = [names[id(norm)], owner]
            for p in self.prefixes:
                source.materialize(model, p, dtype)
                move_resident(model.get_submodule(p), device)
            self.weight = model.get_submodule(owner).weight
        self.model, self.norm = model, norm

    def logprobs(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight.to(self.weight)
        return F.log_softmax(F.linear(self.norm(h), w).float(), dim=-1)

    def measure(self, ref: list[torch.Tensor]) -> Callable[..., float]:
        """error(out, weight=None): mean KL(ref || out) per token through the head (with ``weight`` in place
        of the head's), or without a head the mean squared difference."""
        if not self.ready:
            return lambda out, weight=None: sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref)) \
                / sum(r.shape[0] * r.shape[1] for r in ref)
        p = [self.logprobs(r) for r in ref]

        def kl(out: list[torch.Tensor], weight: torch.Tensor | None = None) -> float:
            total = sum(float((pi.exp() * (pi - self.logprobs(o, weight))).sum()) for pi, o in zip(p, out))
            return total / sum(r.shape[0] * r.shape[1] for r in ref)
        return kl

    def release(self) -> None:
        for p in self.prefixes:
            release(self.model.get_submodule(p))


# ---- the knapsack -----------------------------------------------------------------------------------

def solve(units: list[Unit], free_bytes: int) -> list[int]:
    """One option per unit, least total cost, total bytes within ``free_bytes``: dynamic programming over
    bytes rounded up to free_bytes / DP_STEPS (so any answer fits), then the bytes the rounding left are
    spent greedily on the upgrades that lower the cost most per byte."""
    costs = [np.array(u.error) for u in units]
    step = max(1, -(-free_bytes // DP_STEPS))
    cap = free_bytes // step
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(units), cap + 1), dtype=np.int16)
    for k, u in enumerate(units):
        new = np.full(cap + 1, np.inf)
        for j, b in enumerate(u.bytes):
            w = -(-b // step)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + costs[k][j]
            better = cand < new
            new[better], picks[k][better] = cand[better], j
        best = new
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise LlmqError("no choice of candidates fits the budget")
    choice = [0] * len(units)
    for k in range(len(units) - 1, -1, -1):
        choice[k] = int(picks[k][end])
        end -= -(-units[k].bytes[choice[k]] // step)
    return _fill(units, costs, choice, free_bytes)


def _fill(units: list[Unit], costs: list[np.ndarray], choice: list[int], free_bytes: int) -> list[int]:
    """Spend the bytes left on the best upgrade per byte, while one fits."""
    left = free_bytes - sum(u.bytes[c] for u, c in zip(units, choice))
    while True:
        moves = [((costs[k][c] - costs[k][j]) / (u.bytes[j] - u.bytes[c]), k, j)
                 for k, (u, c) in enumerate(zip(units, choice)) for j in range(len(u.bytes))
                 if 0 < u.bytes[j] - u.bytes[c] <= left and costs[k][j] < costs[k][c]]
        if not moves:
            return choice
        _, k, j = max(moves)
        left -= units[k].bytes[j] - units[k].bytes[choice[k]]
        choice[k] = j
