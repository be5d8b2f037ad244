"""Checkpoint directories: written atomically, read back into a plain torch model.

Writing goes to a hidden temporary directory beside the target and is renamed into
place only when complete, so a failed or interrupted run never leaves a half-written
output.  Reading dequantizes every packed linear into an ordinary ``nn.Linear``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmq.errors import LlmqError
from llmq.experts import ExpertLinears
from llmq.source import ModelSource

# Everything a runtime needs besides the weights; copied verbatim from the source.
SIDECAR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
)


class OutputDir:
    """``with OutputDir(path) as tmp: ...write into tmp...`` -> renamed to ``path`` on success."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path).expanduser()
        self.overwrite = overwrite
        if self.path.exists():
            if not self.path.is_dir():
                raise LlmqError(f"output {str(self.path)!r} exists and is not a directory")
            if any(self.path.iterdir()) and not overwrite:
                raise LlmqError(f"output directory {str(self.path)!r} is not empty (pass --overwrite to replace it)")
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LlmqError(f"cannot create output directory {str(parent)!r}: {e.strerror}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise LlmqError(f"output directory {str(parent)!r} is not writable")
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".llmq-tmp", dir=self.path.parent))
        except OSError as e:
            raise LlmqError(f"cannot write in {str(self.path.parent)!r}: {e.strerror}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 would survive the rename
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        os.rename(self.tmp, self.path)


def copy_sidecars(src_dir: Path, dst_dir: Path) -> None:
    for name in SIDECAR_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)  # not copy2: keep our umask, not read-only modes


def write_config(src_dir: Path, dst_dir: Path, dtype: str, quantization_config: dict[str, Any] | None) -> None:
    """The source config.json, with the output dtype and (if quantized) quantization_config."""
    cfg = json.loads((src_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = dtype
    cfg["torch_dtype"] = dtype  # transformers < 5 and runtimes built on them read this key
    cfg["use_cache"] = True
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (dst_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def quantization_config_of(source: ModelSource) -> dict[str, Any] | None:
    q = getattr(source.config, "quantization_config", None)
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


def load_model(name: str, dtype: torch.dtype = torch.float32, revision: str | None = None,
               trust_remote_code: bool = False) -> tuple[nn.Module, ModelSource]:
    """Any causal LM checkpoint (plain, or GPTQ / AWQ / compressed-tensors packed) as a torch model in ``dtype``."""
    source = ModelSource(name, revision=revision, trust_remote_code=trust_remote_code)
    qcfg = quantization_config_of(source)
    if qcfg is not None:
        # The skeleton must be a plain model: transformers would otherwise look for a quantization backend.
        delattr(source.config, "quantization_config")
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


def iter_quantized(model: nn.Module, source: ModelSource, qcfg: dict[str, Any]):
    """(module name, QuantizedTensor) for every packed linear of a checkpoint, read one at a time."""
    from llmq.formats import format_for_config

    fmt = format_for_config(qcfg)
    spec = fmt.spec_from_config(qcfg)
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and source.has_tensor(f"{mod_name}.{fmt.suffixes[0]}"):
            tensors = {s: source.load_tensor(f"{mod_name}.{s}") for s in fmt.suffixes if source.has_tensor(f"{mod_name}.{s}")}
            yield mod_name, fmt.unpack(tensors, spec, (mod.out_features, mod.in_features))


def stored_prefix(source: ModelSource, mod_name: str, suffix: str) -> str:
    """The key prefix a quantized module's tensors have in its checkpoint ("...block_sparse_moe.experts.3.w1."
    for transformers' "...mlp.experts.3.w1"): module and checkpoint names can differ."""
    key = source.checkpoint_key(f"{mod_name}.{suffix}")
    return key[: -len(suffix)] if key else f"{mod_name}."


def unquantized_linears(model: nn.Module, source: ModelSource, quantized: set[str]) -> list[str]:
    """Checkpoint names of the linears left in floating point (for loaders' ignore lists).

    MoE routers count: transformers holds them as bare weights, runtimes build them as linears."""
    routers = {f"{owner}.{n}" if owner else n for owner, block in model.named_modules()
               if any(isinstance(c, ExpertLinears) for c in block.children())
               for n, c in block.named_children() if not isinstance(c, (nn.Linear, ExpertLinears))
               and isinstance(getattr(c, "weight", None), torch.Tensor) and c.weight.dim() == 2}
    names = []
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.Linear) or name in routers) and name not in quantized:
            key = source.checkpoint_key(f"{name}.weight") or f"{name}.weight"
            names.append(key[: -len(".weight")])
    return names


def _gguf_config(p: Path) -> tuple[Any, torch.Tensor | None]:
    """transformers' config of a GGUF file, completed with what llama.cpp reads and transformers' GGUF
    reader skips: the head size (`attention.key_length`, else embedding length / heads; transformers
    keeps its config class's default, Gemma 256 and Qwen3 128, and other files would not load),
    Gemma 2/3's attention scale, linear rotary scaling, GPT-2's MLP width and context; and the divisors
    of Llama 3.1's rotary frequencies (the file's rope_freqs tensor, which it does not apply either)."""
    import gguf
    from transformers import AutoConfig

    from llmq.formats.gguf import LLAMA_CPP_27B_LAYERS, llama_cpp_attention_scalar

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
        from llmq.formats.gguf import MOE_ROUTING

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
    import copy

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


def load_for_eval(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer, context length) for any checkpoint llmq reads, GGUF files included.

    GGUF goes through transformers' GGUF reader, which dequantizes with the `gguf` package:
    files from llama.cpp and from llmq are measured by the same code.
    """
    from llmq.pipeline import load_tokenizer

    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise LlmqError(f"GGUF file {name!r} does not exist")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            config, freqs = _gguf_config(p)
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
            raise LlmqError(f"cannot read GGUF file {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return model.eval(), tokenizer, getattr(model.config, "max_position_embeddings", None)
    model, source = load_model(name, dtype, trust_remote_code=trust_remote_code)
    return model, load_tokenizer(source), getattr(source.config, "max_position_embeddings", None)
