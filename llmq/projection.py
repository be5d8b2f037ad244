"""Exact on-disk size of a recipe applied to a model described only by its config.

Walks the parameters of the meta-device model tensor by tensor: decoder linears take
the size their format packs them into, everything else (embeddings, head, norms,
biases) the recipe's float dtype.  Safetensors headers are not counted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from llmq.arch import decoder_linears
from llmq.config import QuantizeConfig
from llmq.dtypes import nbytes
from llmq.experts import unfuse_experts
from llmq.formats import FORMATS
from llmq.gguf.model import gguf_config
from llmq.gguf.plan import GGUFPlan, tensor_namer
from llmq.gguf.types import BLOCK_TYPES, FLOAT_TYPES
from llmq.methods import METHODS
from llmq.plan import recipe_grid


def meta_model(config_path: str | Path) -> nn.Module:
    """The model of a config.json on the meta device, its experts one linear each, as llmq quantizes them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in json.loads(Path(config_path).read_text()).items() if k != "architectures"})
    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    unfuse_experts(model)
    return model


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters; a tied head counts once whether or not the module tree shares the tensor."""
    total = sum(p.numel() for p in model.parameters())  # parameters() already yields a shared tensor once
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and emb is not None \
            and head.weight is not emb.weight:
        total -= head.weight.numel()
    return total


def project(model: nn.Module, cfg: QuantizeConfig) -> dict[str, Any]:
    """Bytes by category for ``cfg`` applied to ``model`` (on the meta device)."""
    if cfg.format == "gguf":
        return _project_gguf(model, cfg)
    method = METHODS[cfg.method]
    fbytes = nbytes(method.dtype or cfg.dtype)
    fmt = FORMATS[cfg.format_name()].for_dtype(method.dtype or cfg.dtype) if method.quantizes else None
    grid = recipe_grid(cfg) if method.quantizes else None
    quantized = {n: lin for n, lin in decoder_linears(model).items() if grid.fits(lin.in_features)} if method.quantizes else {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    sizes = {"quantized_linears": 0, "float_tensors": 0}
    qweights = 0
    for mod_name, lin in quantized.items():
        sizes["quantized_linears"] += fmt.nbytes(lin.out_features, lin.in_features, grid)
        qweights += lin.out_features * lin.in_features
    skip = {id(l.weight) for l in quantized.values()}
    for n, p in model.named_parameters():
        if id(p) in skip or (tied and head is not None and p is head.weight and p is not emb.weight):
            continue
        sizes["float_tensors"] += p.numel() * fbytes
    total = sizes["quantized_linears"] + sizes["float_tensors"]
    return {**sizes, "total_bytes": total, "params": parameter_count(model),
            "bits_per_weight": 8 * total / parameter_count(model),
            "bits_per_quantized_weight": 8 * sizes["quantized_linears"] / qweights if qweights else None}




def _project_gguf(model: nn.Module, cfg: QuantizeConfig) -> dict[str, Any]:
    """GGUF tensor bytes, each tensor at the type the GGUF plan gives it (llama.cpp's block sizes)."""
    config = gguf_config(model.config)
    namer = tensor_namer(config)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    plan = GGUFPlan(cfg.gguf_type.upper(), config["num_hidden_layers"], has_output=not tied,
                    token_embd_type=(cfg.gguf_token_embedding_type or "").upper() or None,
                    output_type=(cfg.gguf_output_type or "").upper() or None)
    lin_bytes = other_bytes = qweights = 0
    for name, p in model.named_parameters():
        if tied and head is not None and p is head.weight and p is not emb.weight:
            continue
        gname = namer(name) or name
        t, _ = plan.tensor_type(gname, tuple(p.shape))
        size = BLOCK_TYPES[t].nbytes(tuple(p.shape)) if t in BLOCK_TYPES else p.numel() * FLOAT_TYPES[t].itemsize
        if gname.startswith("blk.") and p.ndim == 2:
            lin_bytes += size
            qweights += p.numel()
        else:
            other_bytes += size
    total = lin_bytes + other_bytes
    n = parameter_count(model)
    return {"quantized_linears": lin_bytes, "float_tensors": other_bytes, "total_bytes": total, "params": n,
            "bits_per_weight": 8 * total / n, "bits_per_quantized_weight": 8 * lin_bytes / qweights if qweights else None}
