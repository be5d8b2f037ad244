"""Reading checkpoints back: any plain or packed checkpoint (llmq's or another tool's) as a torch model.

Every packed linear is dequantized into an ordinary ``nn.Linear``; GGUF files are read by
llmq.gguf.reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmq.errors import LlmqError
from llmq.formats import format_for_config
from llmq.gguf import reader as gguf_reader
from llmq.source import ModelSource


def quantization_config_of(source: ModelSource) -> dict[str, Any] | None:
    q = getattr(source.config, "quantization_config", None)
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


def open_quantized(name: str, trust_remote_code: bool = False) -> tuple[ModelSource, dict[str, Any] | None]:
    """The source and its quantization_config (None for a plain checkpoint), the config stripped of it:
    the skeleton must be a plain model, or transformers would look for a quantization backend."""
    source = ModelSource(name, trust_remote_code=trust_remote_code)
    qcfg = quantization_config_of(source)
    if qcfg is not None:
        delattr(source.config, "quantization_config")
    return source, qcfg


def load_model(name: str, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> tuple[nn.Module, ModelSource]:
    """Any causal LM checkpoint (plain, or GPTQ / AWQ / compressed-tensors packed) as a torch model in ``dtype``."""
    source, qcfg = open_quantized(name, trust_remote_code)
    model = source.skeleton(dtype)
    if qcfg is not None:
        for mod_name, qt in iter_quantized(model, source, qcfg):
            model.get_submodule(mod_name).weight = nn.Parameter(qt.dequantize(dtype), requires_grad=False)
    source.materialize(model, "", dtype)
    if getattr(source.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise LlmqError(f"{name!r} lacks weights for {len(missing)} parameters (first: {missing[0]})")
    return model.eval(), source


def packed_linears(model: nn.Module, source: ModelSource, qcfg: dict[str, Any]) -> list[str]:
    """The names of ``model``'s linears that the checkpoint ``source`` stores packed (no tensor read)."""
    fmt = format_for_config(qcfg)
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and fmt.is_packed(lambda suffix: source.has_tensor(f"{name}.{suffix}"))]


def iter_quantized(model: nn.Module, source: ModelSource, qcfg: dict[str, Any]):
    """(module name, QuantizedTensor) for every packed linear of a checkpoint, read one at a time."""
    fmt = format_for_config(qcfg)
    fmt.grid_from_config(qcfg)  # (an unreadable config fails before any tensor is read)
    for mod_name in packed_linears(model, source, qcfg):
        mod = model.get_submodule(mod_name)
        grid = fmt.module_grid(qcfg, source.module_key(mod_name))
        tensors = {s: source.load_tensor(f"{mod_name}.{s}") for s in fmt.suffixes if source.has_tensor(f"{mod_name}.{s}")}
        try:
            yield mod_name, fmt.unpack(tensors, grid, (mod.out_features, mod.in_features))
        except (KeyError, ValueError, RuntimeError, IndexError) as e:  # tensors missing, or of other shapes
            raise LlmqError(f"the packed tensors of {mod_name!r} in {source.name!r} do not form a "
                            f"{fmt.name} linear of shape {mod.out_features}x{mod.in_features} ({type(e).__name__}: {e})") from None


def load_for_eval(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer, context length) for any checkpoint llmq reads, GGUF files included."""
    if Path(name).suffix == ".gguf":
        return gguf_reader.load(name, dtype)
    model, source = load_model(name, dtype, trust_remote_code=trust_remote_code)
    return model, source.tokenizer(), getattr(source.config, "max_position_embeddings", None)
