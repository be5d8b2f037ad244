"""The frozen plan of one quantization run: every default resolved, everything checked, before any work.

A QuantizeConfig says what the user asked for (unset values meaning "the method's default"); a
RunPlan says what will happen, for this model on this device.  The caller's config is never changed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from llmq.arch import arch_for, decoder_linears, get_module
from llmq.config import CalibConfig, QuantizeConfig, parse_size
from llmq.distributed import Ranks
from llmq.dtypes import compute_dtype
from llmq.errors import LlmqError
from llmq.formats import FORMATS
from llmq.gguf.types import ALLOCATION_TYPES
from llmq.formats.bitsandbytes.grids import FourBitGrid, Int8RowGrid
from llmq.grid import Grid, IntGrid
from llmq.methods import Method, method_class, options_for
from llmq.recipe import check, rule_grid
from llmq.rules import Rule, first_match, parse_rules
from llmq.source import ModelSource


@dataclass(frozen=True)
class Calibration:
    dataset: str
    split: str | None
    nsamples: int
    seqlen: int
    seed: int


@dataclass(frozen=True)
class GGUFTypes:
    file_type: str  # a block type, a mix or a float type
    token_embedding: str | None = None
    output: str | None = None


@dataclass(frozen=True)
class RunPlan:
    method: str
    options: Any  # the method's own options (a frozen dataclass), defaults filled in
    grid: Grid | None  # the recipe's grid; None for a cast.  A GGUF file plans a type per tensor instead.
    format: str | None  # gptq, gptq_v2, awq, compressed-tensors, gguf; None: a plain (cast) checkpoint
    gguf: GGUFTypes | None
    dtype: str  # of the tensors that stay unquantized
    compute_dtype: torch.dtype
    calibration: Calibration | None  # None: the method needs no data
    skip: tuple[str, ...]
    max_shard_bytes: int
    rules: tuple[Rule, ...] = ()  # per-module precision, first match wins; an allocation's come first
    target_size: int | None = None  # bytes the weight files must fit (an allocation), or:
    target_bpw: float | None = None  # bits per parameter of the whole model
    allocate_bits: tuple[int, ...] = ()  # the allocation's candidates
    allocate_group_sizes: tuple[int, ...] = ()
    allocate_gguf_types: tuple[str, ...] = ()

    def skipped(self, module: str) -> bool:
        """Whether a --skip pattern names this linear: a glob over its name or a dotted tail of it
        (mlp.* , *down_proj), or a plain suffix of the name."""
        parts = module.split(".")
        tails = [".".join(parts[i:]) for i in range(len(parts))]
        return any(module.endswith(p) or any(fnmatch.fnmatch(t, p) for t in tails) for p in self.skip)

    def quantizes_module(self, module: str) -> bool:
        """Whether the method quantizes this decoder linear: no rule keeps it in float, and unless a rule
        names it, no --skip pattern does."""
        rule = first_match(self.rules, module)
        return self.quantizes and (not rule.keep if rule is not None else not self.skipped(module))

    def grid_of(self, module: str) -> Grid | None:
        """The grid of a decoder linear: the first matching rule's (None: kept in float), else the recipe's
        unless --skip names it.  GGUF files ask their sink instead (llmq.gguf.plan), which reads the same rules."""
        rule = first_match(self.rules, module)
        if rule is None and self.skipped(module):
            return None
        if rule is None or self.grid is None:
            return self.grid
        if rule.keep:
            return None
        return rule_grid(rule, self.grid) if rule.sets_grid else self.grid

    def make_method(self, ranks: Ranks = Ranks()) -> Method:
        return method_class(self.method)(self.options, self.calibration.seed if self.calibration else 0, ranks)

    @property
    def quantizes(self) -> bool:
        return method_class(self.method).quantizes

    def facts(self) -> dict[str, Any]:
        """How the codes are made, for the formats' quantization_config (keys a method lacks keep the format's default)."""
        o = dataclasses.asdict(self.options)
        facts = {k: o[k] for k in ("act_order", "true_sequential", "damp") if k in o}
        if "static_groups" in o:
            facts["static_groups"] = o["static_groups"] or o["act_order"]
        return {**facts, "method": self.method}

    def recipe(self, targets: bool = False) -> dict[str, Any]:
        """Everything that determines the output, for the provenance record.  ``targets``: keep a size
        budget's settings, if there is one."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("options", "compute_dtype")}
        d.update(compute_dtype=str(self.compute_dtype).removeprefix("torch."),  # (what `auto` resolved to here)
                 options=dataclasses.asdict(self.options), grid=None if self.grid is None else self.grid.name,
                 gguf=None if self.gguf is None else dataclasses.asdict(self.gguf),
                 calibration=None if self.calibration is None else dataclasses.asdict(self.calibration),
                 skip=list(self.skip), rules=[r.to_dict() for r in self.rules])
        budget = self.target_size is not None or self.target_bpw is not None
        for key in ("target_size", "target_bpw", "allocate_bits", "allocate_group_sizes", "allocate_gguf_types"):
            if not (targets and budget):  # (else an allocation is recorded by the rules it made, and its own record)
                del d[key]
        if not self.rules:
            del d["rules"]  # (records of runs without rules read as before)
        return d


def resolve(cfg: QuantizeConfig, source: ModelSource, device: str = "cpu") -> RunPlan:
    check(cfg)
    cls = method_class(cfg.method)
    gguf = cfg.format == "gguf"
    return RunPlan(
        method=cfg.method,
        options=options_for(cfg.method, cfg.options),
        grid=recipe_grid(cfg) if cls.quantizes and not gguf else None,
        format=cfg.format_name() if cls.quantizes or gguf else None,
        gguf=GGUFTypes(cfg.gguf_type.upper(), cfg.gguf_token_embedding_type, cfg.gguf_output_type) if gguf else None,
        dtype=cls.dtype or cfg.dtype,
        compute_dtype=compute_dtype(cfg.compute_dtype, source.dtype(), device),
        # (an allocation probes with calibration text whatever the method)
        calibration=_calibration(cfg, cls, source) if cls.needs_calibration or _allocates(cfg) or cfg.tune_steps else None,
        skip=tuple(cfg.skip),
        max_shard_bytes=parse_size(cfg.max_shard_size),
        rules=parse_rules(cfg.rules),
        target_size=None if cfg.target_size is None else parse_size(cfg.target_size),
        target_bpw=cfg.target_bpw,
        allocate_bits=tuple(cfg.allocate_bits),
        allocate_group_sizes=tuple(cfg.allocate_group_sizes),
        allocate_gguf_types=tuple(t.upper() for t in cfg.allocate_gguf_types or ALLOCATION_TYPES),
    )


def quantizable_head(plan: RunPlan, model: nn.Module) -> str | None:
    """The output head's module name when this checkpoint format stores it packed (an untied head; GGUF
    files plan their head themselves), else None."""
    head = model.get_output_embeddings()
    if plan.gguf is not None or plan.format is None or head is None or not FORMATS[plan.format].quantizes_head \
            or getattr(model.config, "tie_word_embeddings", False):
        return None
    return next(n for n, m in model.named_modules() if m is head)


def head_grid(plan: RunPlan, model: nn.Module) -> Callable[[str], Grid | None]:
    """For emit_rest: the grid of the checkpoint's head (by parameter name) when a rule quantizes it."""
    head = quantizable_head(plan, model)
    rule = first_match(plan.rules, head) if head is not None else None
    grid = rule_grid(rule, plan.grid) if rule is not None and rule.sets_grid else None
    return lambda name: grid if name == f"{head}.weight" else None


def check_rules_on(plan: RunPlan, model: nn.Module) -> None:
    """Rules against this model's modules, before any work: each must match a module it can apply to, and
    (checkpoint formats) siblings that runtimes fuse into one linear (q/k/v, gate/up) must share a grid."""
    if not plan.rules:
        return
    arch = arch_for(model)
    linears = decoder_linears(model, arch)
    names = [*linears, *filter(None, [quantizable_head(plan, model)])] if plan.gguf is None else \
        [n.removesuffix(".weight") for n, p in model.named_parameters() if p.dim() == 2]
    for rule in plan.rules:
        if not any(rule.matches(n) for n in names):
            where = "decoder linear or (gptq) head, what checkpoint formats quantize" if plan.gguf is None else "weight"
            raise LlmqError(f"rule {rule.match!r} matches no {where} of this model; names look like {names[0]!r}")
    if plan.gguf is not None or arch.discovered:
        return
    for i in range(len(get_module(model, arch.layers))):
        for group in arch.sequential:
            grids = {plan.grid_of(f"{arch.layers}.{i}.{n}") for n in group}
            if len(grids) > 1:
                raise LlmqError(f"the rules give {', '.join(group)} of layer {i} different grids; runtimes (vLLM) "
                                "fuse them into one linear, so give them one rule")


def _allocates(cfg: QuantizeConfig) -> bool:
    return cfg.target_size is not None or cfg.target_bpw is not None


def recipe_grid(cfg: QuantizeConfig) -> Grid:
    """The recipe's grid: bitsandbytes' (blocks of 64, as transformers writes them) or the integer grid."""
    if cfg.format == "bitsandbytes":
        return FourBitGrid(cfg.bnb_4bit_quant_type, 64, cfg.bnb_4bit_use_double_quant) if cfg.bits == 4 else Int8RowGrid()
    # Ranges searched as the recipe says, else as the method does by default (llmq.grid; AWQ clips its own way).
    search = method_class(cfg.method).grid_search if cfg.grid_search is None else cfg.grid_search
    return IntGrid(cfg.bits, cfg.group_size, cfg.sym, search=search, full_range=cfg.full_range)


def _calibration(cfg: QuantizeConfig, cls: type[Method], source: ModelSource) -> Calibration:
    return resolve_calibration(cfg.calibration, source, cls.default_dataset, cls.default_seqlen)


def resolve_calibration(c: CalibConfig, source: ModelSource, dataset: str, seqlen: int) -> Calibration:
    """The windows ``c`` asks for, its unset dataset and window length taken from ``dataset`` and ``seqlen``
    (the window capped by the model's context)."""
    context = getattr(source.config, "max_position_embeddings", None)
    length = c.seqlen or min(seqlen, context or seqlen)
    if context is not None and length > context:
        raise LlmqError(f"--seqlen {length} exceeds the model's context length {context}")
    return Calibration(dataset=c.dataset or dataset, split=c.split, nsamples=c.nsamples, seqlen=length, seed=c.seed)
