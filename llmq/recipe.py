"""Recipes: a YAML file and command-line flags turned into a checked QuantizeConfig.

Flags the user actually passed override the file; flags left unset (None) do not.  Everything
is checked here, before any work: the method and its own keys, the grid, the format and GGUF types.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from llmq.config import CALIB_KEYS, GENERIC_KEYS, CalibConfig, QuantizeConfig, parse_size
from llmq.dtypes import COMPUTE_DTYPES, FLOAT_DTYPES
from llmq.errors import LlmqError
from llmq.formats import FORMATS
from llmq.gguf.types import BLOCK_TYPES, GGUF_TYPES, MIXES, check_type
from llmq.grid import SUPPORTED_BITS, IntGrid
from llmq.methods import method_class, option_names, options_for
from llmq.rules import Rule, parse_rules


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
    """Recipe values first, then every override that is not None; checked."""
    top: dict[str, Any] = {}
    calib: dict[str, Any] = {}
    options: dict[str, Any] = {}
    methods_keys = option_names()

    def put(key: str, value: Any, where: str) -> None:
        key = key.replace("-", "_")
        if key in GENERIC_KEYS:
            top[key] = value
        elif key in CALIB_KEYS:
            calib[key] = value
        elif key in methods_keys:
            options[key] = value
        else:
            raise LlmqError(f"unknown {where} key {key!r}")

    for key, value in recipe.items():
        if key == "calibration":
            if not isinstance(value, dict):
                raise LlmqError("recipe key 'calibration' must be a mapping")
            for k, v in value.items():
                if k.replace("-", "_") not in CALIB_KEYS:
                    raise LlmqError(f"unknown calibration key {k!r} in recipe")
                put(k, v, "calibration")
        else:
            put(key, value, "recipe")
    for key, value in overrides.items():
        if key == "rules" and value:  # the command line's rules come first: they win where both match
            top["rules"] = [*value, *(top.get("rules") or [])]
        elif value is not None:
            put(key, value, "option")
    try:
        cfg = QuantizeConfig(**top, calibration=CalibConfig(**calib), options=options)
    except TypeError as e:
        raise LlmqError(f"bad recipe: {e}") from None
    check(cfg)
    return cfg


def check(cfg: QuantizeConfig) -> None:
    """Raise LlmqError for anything a run of ``cfg`` could not do."""
    method = method_class(cfg.method)
    options_for(cfg.method, cfg.options)
    if cfg.format == "bitsandbytes":
        if cfg.bits not in (4, 8):
            raise LlmqError(f"--format bitsandbytes stores 4-bit (NF4/FP4) or 8-bit (LLM.int8) codes, not {cfg.bits}-bit")
        if cfg.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise LlmqError(f"--bnb-type must be nf4 or fp4, got {cfg.bnb_4bit_quant_type!r}")
    elif cfg.bnb_4bit_quant_type != "nf4" or cfg.bnb_4bit_use_double_quant:
        raise LlmqError("--bnb-type and --bnb-double-quant apply only with --format bitsandbytes")
    if method.quantizes and cfg.format not in ("gguf", "bitsandbytes"):
        if cfg.bits not in SUPPORTED_BITS:
            raise LlmqError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {cfg.bits}")
        if not isinstance(cfg.group_size, int) or (cfg.group_size != -1 and cfg.group_size <= 0):
            raise LlmqError(f"--group-size must be -1 (per channel) or positive, got {cfg.group_size}")
    if cfg.format == "gguf":
        if (cfg.gguf_type or "").upper() not in GGUF_TYPES:
            raise LlmqError(f"--format gguf needs --gguf-type, one of {', '.join(GGUF_TYPES)}")
        for flag, value in (("--gguf-token-embedding-type", cfg.gguf_token_embedding_type),
                            ("--gguf-output-type", cfg.gguf_output_type)):
            if value:
                check_type(value, flag, mixes=False)
        if not method.quantizes and cfg.gguf_type.upper() in (*BLOCK_TYPES, *MIXES):
            raise LlmqError(f"method {cfg.method} casts; a {cfg.gguf_type.upper()} file needs a quantization method")
    elif cfg.gguf_type or cfg.gguf_token_embedding_type or cfg.gguf_output_type:
        raise LlmqError("--gguf-type and the GGUF tensor types apply only with --format gguf")
    elif cfg.format is not None and cfg.format not in FORMATS:
        raise LlmqError(f"unknown format {cfg.format!r}; choose from {', '.join([*FORMATS, 'gguf'])}")
    if cfg.grid_search is not None and not isinstance(cfg.grid_search, bool):
        raise LlmqError(f"grid_search must be true or false, got {cfg.grid_search!r}")
    if not isinstance(cfg.full_range, bool):
        raise LlmqError(f"full_range must be true or false, got {cfg.full_range!r}")
    if cfg.full_range and cfg.format in ("gguf", "bitsandbytes"):  # (asymmetric grids: no say, as the flag's help says)
        raise LlmqError(f"--full-range applies to symmetric integer grids; --format {cfg.format} fits its own grids")
    if cfg.grid_search and cfg.format in ("gguf", "bitsandbytes"):
        raise LlmqError(f"--grid-search applies to integer grids; --format {cfg.format} fits its own grids "
                        "(GGUF's K-quants already search with diag(H) as importance)")
    if cfg.options.get("refit_scales") is True and cfg.format in ("gguf", "bitsandbytes"):
        raise LlmqError(f"--refit-scales applies to integer grids; --format {cfg.format} stores scales of its own kind")
    if cfg.dtype not in FLOAT_DTYPES:
        raise LlmqError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {cfg.dtype!r}")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise LlmqError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {cfg.compute_dtype!r}")
    check_calibration(cfg.calibration)
    if not isinstance(cfg.skip, list):
        raise LlmqError("recipe key 'skip' must be a list of patterns")
    parse_size(cfg.max_shard_size)
    check_rules(cfg)
    check_target(cfg)
    check_tune(cfg)


def check_calibration(c: CalibConfig) -> None:
    if not isinstance(c.nsamples, int) or c.nsamples <= 0:
        raise LlmqError(f"--nsamples must be positive, got {c.nsamples}")
    if c.seqlen is not None and (not isinstance(c.seqlen, int) or c.seqlen <= 1):
        raise LlmqError(f"--seqlen must be at least 2, got {c.seqlen}")


def check_tune(cfg: QuantizeConfig) -> None:
    if not isinstance(cfg.tune_steps, int) or isinstance(cfg.tune_steps, bool) or cfg.tune_steps < 0:
        raise LlmqError(f"tune_steps must be a whole number >= 0, got {cfg.tune_steps!r}")
    if not isinstance(cfg.tune_lr, (int, float)) or isinstance(cfg.tune_lr, bool) or not cfg.tune_lr > 0:
        raise LlmqError(f"tune_lr must be positive, got {cfg.tune_lr!r}")
    if not isinstance(cfg.tune_batch, int) or isinstance(cfg.tune_batch, bool) or cfg.tune_batch <= 0:
        raise LlmqError(f"tune_batch must be a whole number > 0, got {cfg.tune_batch!r}")
    if not isinstance(cfg.tune_sampled, int) or isinstance(cfg.tune_sampled, bool) or cfg.tune_sampled < 0:
        raise LlmqError(f"tune_sampled must be a whole number >= 0, got {cfg.tune_sampled!r}")
    for key in ("tune_head", "tune_codes", "tune_recompute"):
        if not isinstance(getattr(cfg, key), bool):
            raise LlmqError(f"{key} must be true or false, got {getattr(cfg, key)!r}")
    if cfg.tune_steps and (cfg.format in ("gguf", "bitsandbytes") or not method_class(cfg.method).quantizes):
        raise LlmqError("tune_steps tunes integer-grid scales: it needs a quantization method and a gptq, gptq_v2, awq "
                        f"or compressed-tensors file, not {cfg.format or cfg.method}")


def check_rules(cfg: QuantizeConfig) -> None:
    """Every rule is one the output format can carry the way its runtimes read it."""
    rules = parse_rules(cfg.rules)
    if rules and not method_class(cfg.method).quantizes:
        raise LlmqError(f"method {cfg.method} casts every tensor; per-module rules need a quantization method")
    for r in rules:
        if cfg.format == "gguf":
            if r.sets_grid:
                raise LlmqError(f"rule {r.match!r}: a GGUF file stores llama.cpp types; give type (one of --gguf-type's), not bits/group_size/sym")
            if r.type:
                check_type(r.type, f"rule {r.match!r} type", mixes=False)
            continue
        if r.type:
            raise LlmqError(f"rule {r.match!r}: type sets GGUF tensor types and needs --format gguf; use bits/group_size/sym")
        if not r.sets_grid:
            continue
        fmt = FORMATS[cfg.format_name()]
        if not fmt.mixes_grids:
            raise LlmqError(f"format {fmt.name!r} stores one grid for all its linears; its rules can only keep modules unquantized")
        grid = rule_grid(r, IntGrid(cfg.bits, cfg.group_size, cfg.sym))
        fmt.check(grid)


def rule_grid(rule: Rule, base: IntGrid) -> IntGrid:
    """The integer grid a rule sets: the recipe's, with the rule's keys in place."""
    bits = base.bits if rule.bits is None else rule.bits
    group = base.group_size if rule.group_size is None else rule.group_size
    if bits not in SUPPORTED_BITS:
        raise LlmqError(f"rule {rule.match!r}: bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    if group != -1 and group <= 0:
        raise LlmqError(f"rule {rule.match!r}: group_size must be -1 (per channel) or positive, got {group}")
    return dataclasses.replace(base, bits=bits, group_size=group, sym=base.sym if rule.sym is None else rule.sym)


def check_target(cfg: QuantizeConfig) -> None:
    if cfg.target_size is None and cfg.target_bpw is None:
        return
    if cfg.target_size is not None and cfg.target_bpw is not None:
        raise LlmqError("give --target-size or --target-bpw, not both")
    if cfg.target_size is not None:
        parse_size(cfg.target_size)
    elif not isinstance(cfg.target_bpw, (int, float)) or isinstance(cfg.target_bpw, bool) or not 1 <= cfg.target_bpw <= 32:
        raise LlmqError(f"--target-bpw must be a number of bits per weight between 1 and 32, got {cfg.target_bpw!r}")
    if not method_class(cfg.method).quantizes:
        raise LlmqError(f"method {cfg.method} casts; allocating bits to a size needs a quantization method")
    if not cfg.allocate_bits or any(b not in SUPPORTED_BITS for b in cfg.allocate_bits):
        raise LlmqError(f"allocate_bits must be a list of {', '.join(map(str, SUPPORTED_BITS))}, got {cfg.allocate_bits!r}")
    if any(not isinstance(g, int) or (g != -1 and g <= 0) for g in cfg.allocate_group_sizes):
        raise LlmqError(f"allocate_group_sizes must be -1 or positive integers, got {cfg.allocate_group_sizes!r}")
    for t in cfg.allocate_gguf_types or ():
        if str(t).upper() not in BLOCK_TYPES:
            raise LlmqError(f"allocate_gguf_types: {t!r} is not a GGUF block type ({', '.join(BLOCK_TYPES)})")
    if cfg.format != "gguf" and not FORMATS[cfg.format_name()].mixes_grids:
        raise LlmqError(f"format {cfg.format_name()!r} stores one grid for all its linears, so it cannot mix bits to meet a "
                        "size; use gptq, gptq_v2, compressed-tensors or gguf")


def save_recipe(path: str | Path, cfg: QuantizeConfig, rules: tuple[Rule, ...] = ()) -> None:
    """``cfg`` as a recipe file that reproduces the run: an allocation's rules written out ahead of the
    recipe's own, the size target dropped (the rules are its answer).  Written whole or not at all."""
    data = cfg.to_dict()
    data.update(target_size=None, target_bpw=None,
                rules=[r.to_dict() for r in rules] + [r.to_dict() for r in parse_rules(cfg.rules)])
    data = {k: v for k, v in data.items() if v is not None and v != [] and v != {}}
    p = Path(path)
    if p.is_dir():
        raise LlmqError(f"--save-recipe {str(p)!r} is a directory")
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LlmqError(f"cannot write the recipe {str(p)!r}: {e.strerror}") from None
