"""The frozen plan of one quantization run: every default resolved, everything checked, before any work.

A QuantizeConfig says what the user asked for (unset values meaning "the method's default"); a
RunPlan says what will happen, for this model on this device.  The caller's config is never changed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from llmq.config import QuantizeConfig, parse_size
from llmq.errors import LlmqError
from llmq.formats.bitsandbytes.grids import FourBitGrid, Int8RowGrid
from llmq.grid import Grid, IntGrid
from llmq.methods import Method, method_class, options_for
from llmq.recipe import check
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

    def make_method(self) -> Method:
        return method_class(self.method)(self.options, self.calibration.seed if self.calibration else 0)

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

    def recipe(self) -> dict[str, Any]:
        """Everything that determines the output, for the provenance record."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("options", "compute_dtype")}
        d.update(options=dataclasses.asdict(self.options), grid=None if self.grid is None else self.grid.name,
                 gguf=None if self.gguf is None else dataclasses.asdict(self.gguf),
                 calibration=None if self.calibration is None else dataclasses.asdict(self.calibration),
                 skip=list(self.skip))
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
        # Calibration runs in fp32 on CPU (fp16 matmuls are slow and lossy there); on a GPU the model dtype is fine.
        compute_dtype=torch.float32 if torch.device(device).type == "cpu" else source.dtype(),
        calibration=_calibration(cfg, cls, source) if cls.needs_calibration else None,
        skip=tuple(cfg.skip),
        max_shard_bytes=parse_size(cfg.max_shard_size),
    )


def recipe_grid(cfg: QuantizeConfig) -> Grid:
    """The recipe's grid: bitsandbytes' (blocks of 64, as transformers writes them) or the integer grid."""
    if cfg.format == "bitsandbytes":
        return FourBitGrid(cfg.bnb_4bit_quant_type, 64, cfg.bnb_4bit_use_double_quant) if cfg.bits == 4 else Int8RowGrid()
    return IntGrid(cfg.bits, cfg.group_size, cfg.sym)


def _calibration(cfg: QuantizeConfig, cls: type[Method], source: ModelSource) -> Calibration:
    c = cfg.calibration
    context = getattr(source.config, "max_position_embeddings", None)
    seqlen = c.seqlen or min(cls.default_seqlen, context or cls.default_seqlen)
    if context is not None and seqlen > context:
        raise LlmqError(f"--seqlen {seqlen} exceeds the model's context length {context}")
    return Calibration(dataset=c.dataset or cls.default_dataset, split=c.split, nsamples=c.nsamples, seqlen=seqlen, seed=c.seed)
