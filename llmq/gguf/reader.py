"""Reading GGUF files back as torch models, for `llmq eval` and the report.

Files go through transformers' GGUF reader, which dequantizes with the `gguf` package, so files
from llama.cpp and from llmq are measured by the same code; this module completes what that
reader skips (see _config) and reads the MoE layout it does not know.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from llmq.errors import LlmqError
from llmq.gguf.model import LINEAR_TENSORS, LLAMA_CPP_27B_LAYERS, MOE_ROUTING, PROVENANCE_KEY, llama_cpp_attention_scalar


def load(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, context length) of a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_file():
        raise LlmqError(f"GGUF file {str(path)!r} does not exist")
    try:
        config, freqs = _config(p)
        if config.model_type == "llama" and getattr(config, "num_local_experts", 0):
            model = _llama_with_experts(p, config, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, config=config, dtype=dtype)
        if freqs is not None:  # llama.cpp divides each rotary frequency by its factor
            for mod in model.modules():
                if isinstance(getattr(mod, "inv_freq", None), torch.Tensor):
                    mod.inv_freq = mod.inv_freq / freqs.to(mod.inv_freq)
                    mod.original_inv_freq = mod.inv_freq
        tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    except Exception as e:
        raise LlmqError(f"cannot read GGUF file {str(path)!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return model.eval(), tokenizer, getattr(model.config, "max_position_embeddings", None)


def measure(path: Path, model_params: int, linear_weights: int) -> dict[str, Any]:
    """File bytes, and bits per weight over the whole model and over the decoder linears (experts included)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    lin = sum(b for k, b in tensors.items() if k.startswith("blk.") and _is_linear(k.split(".")[2]))
    return {"file_bytes": path.stat().st_size, "tensor_bytes": sum(tensors.values()),
            "bits_per_weight": 8 * sum(tensors.values()) / model_params, "bits_per_linear_weight": 8 * lin / linear_weights}


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix, as llama.cpp's tools name them), not a directory."""
    return path.is_file() and path.suffix == ".gguf"


def provenance(path: Path) -> dict[str, Any]:
    """The provenance record llmq wrote into a GGUF file's metadata (empty for a file llmq did not write)."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get(PROVENANCE_KEY)
    except Exception as e:  # (not a GGUF file, or a damaged one)
        raise LlmqError(f"cannot read GGUF file {str(path)!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return {} if field is None else json.loads(field.contents())


def _is_linear(kind: str) -> bool:
    """attn_q ... ffn_down, and the MoE experts' stacked ffn_*_exps and shared experts' ffn_*_shexp."""
    return kind.removesuffix("_exps").removesuffix("_shexp") in LINEAR_TENSORS


def _config(p: Path) -> tuple[Any, torch.Tensor | None]:
    """transformers' config of a GGUF file, completed with what llama.cpp reads and transformers' GGUF
    reader skips: the head size (`attention.key_length`, else embedding length / heads; transformers
    keeps its config class's default, Gemma 256 and Qwen3 128, and other files would not load),
    Gemma 2/3's attention scale, linear rotary scaling, GPT-2's MLP width and context; and the divisors
    of Llama 3.1's rotary frequencies (the file's rope_freqs tensor, which it does not apply either)."""
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
    reader = gguf.GGUFReader(str(p))  # memory-mapped: only what is used is read
    fields = reader.fields
    arch = fields["general.architecture"].contents()
    value = lambda key: fields[f"{arch}.{key}"].contents() if f"{arch}.{key}" in fields else None  # noqa: E731
    head_dim = value("attention.key_length")
    heads = value("attention.head_count")
    if head_dim is None and isinstance(heads, int) and heads and isinstance(value("embedding_length"), int):
        head_dim = value("embedding_length") // heads
    if head_dim and hasattr(config, "head_dim"):
        config.head_dim = int(head_dim)
    if hasattr(config, "query_pre_attn_scalar") and arch in LLAMA_CPP_27B_LAYERS:  # neither is it read
        config.query_pre_attn_scalar = llama_cpp_attention_scalar(arch, config.num_hidden_layers, config.hidden_size,
                                                                  config.num_attention_heads, config.head_dim)
    if arch == "gpt2":  # nor GPT-2's MLP width and context (transformers keeps 4 x hidden and 1024)
        config.n_inner, config.n_positions = value("feed_forward_length"), value("context_length")
    if arch == "llama" and value("expert_count"):  # Mixtral: read by _llama_with_experts
        config.num_local_experts, config.num_experts_per_tok = int(value("expert_count")), int(value("expert_used_count"))
    if value("expert_count"):  # nor the experts' widths, and llama.cpp's MoE graphs fix what configs leave open
        if value("expert_feed_forward_length") and hasattr(config, "moe_intermediate_size"):
            config.moe_intermediate_size = int(value("expert_feed_forward_length"))
        if value("expert_shared_feed_forward_length") and hasattr(config, "shared_expert_intermediate_size"):
            config.shared_expert_intermediate_size = int(value("expert_shared_feed_forward_length"))
        if hasattr(config, "norm_topk_prob") and config.model_type in MOE_ROUTING:
            config.norm_topk_prob = MOE_ROUTING[config.model_type]
        if hasattr(config, "decoder_sparse_step"):  # experts in every layer
            config.decoder_sparse_step, config.mlp_only_layers = 1, []
    rope = getattr(config, "rope_parameters", None)
    if value("rope.scaling.type") == "linear" and value("rope.scaling.factor") and isinstance(rope, dict):
        # nor is linear rotary scaling; Gemma 3 keeps rotary per layer type, and llama.cpp scales the global layers'
        rope.get("full_attention", rope).update(rope_type="linear", factor=float(value("rope.scaling.factor")))
    freqs = next((torch.from_numpy(t.data.copy()).float() for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return config, freqs


def _llama_with_experts(p: Path, config, dtype: torch.dtype):
    """A Mixtral-style file (llama.cpp's llama graph with experts, as convert_hf_to_gguf writes Mixtral) as
    transformers' Mixtral model.  transformers' GGUF reader knows such a file only as a dense Llama and
    skips the experts: it reads the attention, norms, embedding and head (with a one-wide dense MLP,
    so nothing is allocated for the MLP the file lacks); the routers and the experts' stacked tensors
    are dequantized here with the `gguf` package, as the reader dequantizes the others."""
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM, MixtralConfig
    from transformers.utils import logging as hf_logging

    slim = copy.deepcopy(config)
    slim.intermediate_size = 1
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would list the dense MLP as missing
    try:
        dense = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, config=slim, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    del dense
    c = config
    n_exp, inter, hidden = c.num_local_experts, c.intermediate_size, c.hidden_size
    reader = gguf.GGUFReader(str(p))
    tensors = {t.name: t for t in reader.tensors}

    def read(name: str, *shape: int) -> torch.Tensor:
        t = tensors[name]
        return torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(shape).to(dtype)

    for i in range(c.num_hidden_layers):
        gate, up = (read(f"blk.{i}.ffn_{w}_exps.weight", n_exp, inter, hidden) for w in ("gate", "up"))
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        state[f"model.layers.{i}.mlp.experts.down_proj"] = read(f"blk.{i}.ffn_down_exps.weight", n_exp, hidden, inter)
        state[f"model.layers.{i}.mlp.gate.weight"] = read(f"blk.{i}.ffn_gate_inp.weight", n_exp, hidden)
    mixtral = MixtralConfig(**{k: v for k, v in c.to_dict().items() if k not in ("model_type", "architectures")})
    model = AutoModelForCausalLM.from_config(mixtral, dtype=dtype)
    model.load_state_dict(state, strict=True)
    return model
