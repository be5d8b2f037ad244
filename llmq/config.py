"""Run configuration: dataclasses, YAML recipes, and CLI overrides.

A recipe file holds the same keys as :class:`QuantizeConfig` (calibration keys
nested under ``calibration:``).  Command-line flags that the user actually passed
override the file; flags left at their defaults do not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmq.errors import LlmqError
from llmq.grid import GGUF_GRIDS, SUPPORTED_BITS, QuantSpec

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class CalibConfig:
    dataset: str | None = None  # None: the method's default (wikitext2 for GPTQ, pile-val for AWQ)
    split: str | None = None
    nsamples: int = 128
    seqlen: int | None = None  # None: min(2048, model context)
    seed: int = 0


@dataclass
class QuantizeConfig:
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    # GPTQ
    damp: float = 0.01
    block_size: int = 128
    # None: the method's default (on for GPTQ: with static groups it costs nothing at inference
    # and lowered KL in every setting we measured; llm-compressor defaults to the same).
    act_order: bool | None = None
    static_groups: bool = False  # group scales fixed from the unquantized weights; implied by act_order
    true_sequential: bool = True
    # AWQ
    awq_clip: bool = True  # awq: search a per-group clipping range after scaling
    awq_clip_gptq: bool = False  # awq+gptq: the same (off: tuned for RTN, it hurts GPTQ; see eval/)
    # output
    format: str | None = None  # None: gptq (v1) for symmetric grids, gptq_v2 for asymmetric ones
    gguf_type: str | None = None  # with format gguf: a block type, a mix (Q4_K_M) or a float type, see gguf_plan
    gguf_token_embedding_type: str | None = None  # None: llama-quantize's choice (the base type)
    gguf_output_type: str | None = None  # None: llama-quantize's choice (Q6_K)
    dtype: str = "float16"  # dtype of the tensors that stay unquantized (embeddings, norms, biases)
    max_shard_size: str = "4GB"
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    calibration: CalibConfig = field(default_factory=CalibConfig)

    def spec(self) -> QuantSpec:
        """The grid of the recipe; with a GGUF type, that of its base type (a GGUF plan may give
        single tensors other types, see gguf_plan)."""
        if self.gguf_type:
            from llmq.gguf_plan import MIXES

            grid = MIXES.get(self.gguf_type.upper(), self.gguf_type.upper()).lower()
            if grid in GGUF_GRIDS:  # the GGUF block type fixes bits, group size and grid
                return QuantSpec.for_gguf(grid)
        return QuantSpec(bits=self.bits, group_size=self.group_size, sym=self.sym)

    def format_name(self) -> str:
        return self.format or ("gptq" if self.sym else "gptq_v2")

    def validate(self) -> None:
        from llmq.methods import METHODS  # late: methods import config

        if self.method not in METHODS:
            raise LlmqError(f"unknown method {self.method!r}; choose from {', '.join(sorted(METHODS))}")
        if METHODS[self.method].quantizes:
            if self.bits not in SUPPORTED_BITS:
                raise LlmqError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
            if self.group_size != -1 and self.group_size <= 0:
                raise LlmqError(f"--group-size must be -1 (per channel) or positive, got {self.group_size}")
        from llmq.formats import FORMATS

        if self.format == "gguf":
            from llmq.gguf_plan import GGUF_TYPES

            if (self.gguf_type or "").upper() not in GGUF_TYPES:
                raise LlmqError(f"--format gguf needs --gguf-type, one of {', '.join(GGUF_TYPES)}")
            from llmq.gguf_plan import check_gguf_type

            if self.gguf_token_embedding_type:
                check_gguf_type(self.gguf_token_embedding_type, "--gguf-token-embedding-type", mixes=False)
            if self.gguf_output_type:
                check_gguf_type(self.gguf_output_type, "--gguf-output-type", mixes=False)
        elif self.gguf_type is not None and self.format not in ("raw", "gptq_v2"):  # the staging checkpoint of a GGUF run
            raise LlmqError("--gguf-type applies only with --format gguf")
        elif self.format is not None and self.format not in FORMATS:
            raise LlmqError(f"unknown format {self.format!r}; choose from {', '.join(FORMATS)}")
        if self.dtype not in DTYPES:
            raise LlmqError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 < self.damp < 1:
            raise LlmqError(f"--damp must be in (0, 1), got {self.damp}")
        c = self.calibration
        if c.nsamples <= 0:
            raise LlmqError(f"--nsamples must be positive, got {c.nsamples}")
        if c.seqlen is not None and c.seqlen <= 1:
            raise LlmqError(f"--seqlen must be at least 2, got {c.seqlen}")
        parse_size(self.max_shard_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_size(text: str | int) -> int:
    """'4GB', '500MB', '1.5GiB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            s, m = s[: -len(unit)], mult
            break
    else:
        m = 1
    try:
        value = int(float(s) * m)
    except ValueError:
        raise LlmqError(f"cannot read size {text!r}; use e.g. 4GB or 500MB") from None
    if value <= 0:
        raise LlmqError(f"size must be positive, got {text!r}")
    return value


def load_recipe(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LlmqError(f"recipe {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LlmqError(f"recipe {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LlmqError(f"recipe {str(p)!r} must be a mapping of options")
    return data


def build_config(recipe: dict[str, Any], overrides: dict[str, Any]) -> QuantizeConfig:
    """Recipe values first, then every override that is not None."""
    known = {f.name for f in dataclasses.fields(QuantizeConfig)} - {"calibration"}
    calib_known = {f.name for f in dataclasses.fields(CalibConfig)}
    top: dict[str, Any] = {}
    calib: dict[str, Any] = {}
    for key, value in recipe.items():
        key = key.replace("-", "_")
        if key == "calibration":
            if not isinstance(value, dict):
                raise LlmqError("recipe key 'calibration' must be a mapping")
            for k, v in value.items():
                k = k.replace("-", "_")
                if k not in calib_known:
                    raise LlmqError(f"unknown calibration key {k!r} in recipe")
                calib[k] = v
        elif key in known:
            top[key] = value
        elif key in calib_known:
            calib[key] = value
        else:
            raise LlmqError(f"unknown recipe key {key!r}")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in calib_known:
            calib[key] = value
        elif key in known:
            top[key] = value
    cfg = QuantizeConfig(**top, calibration=CalibConfig(**calib))
    cfg.validate()
    if cfg.act_order is None:
        from llmq.methods import METHODS

        cfg.act_order = METHODS[cfg.method].act_order_default
    return cfg
