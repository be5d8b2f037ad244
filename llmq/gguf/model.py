"""What llama.cpp's graph of each family expects of a file: the architecture names, the configs it
can compute (others are refused before any work), the metadata keys, and how tensors are stored
(row orders for rotary layouts and fused q/k/v, Gemma's norms as 1 + w).
"""

from __future__ import annotations

from typing import Any

import torch

from llmq.errors import LlmqError

# model_type -> gguf's architecture name.  q/k rows are permuted only for the Llama family, whose
# llama.cpp graph expects the rotary layout of the original Meta checkpoints.
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "phi": "phi2",
              "gpt_neox": "gptneox", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt2": "gpt2",
              "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
PERMUTE_QK = ("llama", "mistral", "mixtral")
# Gemma's RMSNorms scale by (1 + w); llama.cpp's graph multiplies by the stored weight, so norms are written as 1 + w.
NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3_text")
# The decoder linears of llama.cpp's graphs (for bits-per-weight over the linears).
LINEAR_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gguf_config(c) -> dict[str, Any]:
    """A transformers config as a dict: legacy spellings (rope_theta, rope_scaling, Gemma 3's
    rope_local_base_freq and sliding_window_pattern) arrive as today's rope_parameters and layer_types,
    whichever transformers version wrote config.json, and sizes a family names its own way (GPT-2's
    n_embd, ...) also under the common names, through the config's attribute_map."""
    cfg = c.to_dict()
    cfg.update({name: getattr(c, name) for name in c.attribute_map})
    if cfg.get("model_type") == "gpt2":  # sizes that attribute_map leaves out
        cfg.update(intermediate_size=c.n_inner or 4 * c.n_embd, layer_norm_eps=c.layer_norm_epsilon)
    return cfg


def expert_counts(config: dict[str, Any]) -> tuple[int, int]:
    """(routed experts per layer, experts used per token); (0, 0) for a dense model."""
    n = int(config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0)
    return (n, int(config["num_experts_per_tok"])) if n else (0, 0)


def check_arch(config: dict[str, Any]) -> None:
    """Refuse, before any work, a model llama.cpp's graph for its architecture would compute differently."""
    mt = config.get("model_type")
    if mt not in GGUF_ARCHS:
        raise LlmqError(f"GGUF export supports {', '.join(GGUF_ARCHS)} models, not {mt!r}")
    if mt in ("gemma", "gemma2") and not config.get("tie_word_embeddings", True):
        raise LlmqError(f"llama.cpp's {mt} graph has no output head of its own; this model's lm_head is not tied")
    if mt in GEMMA_SWA:
        _check_gemma(config)
    if mt == "gpt2" and (config.get("scale_attn_by_inverse_layer_idx") or not config.get("scale_attn_weights", True)):
        raise LlmqError("llama.cpp's gpt2 graph scales attention by 1/sqrt(head_dim) in every layer; this model does not")
    if mt in MOE_ROUTING:
        _check_moe(config)
    kind = rope_of(config).get("rope_type", "default")
    allowed = ("default", "linear", "llama3") if mt in PERMUTE_QK else ("default", "linear")
    if kind not in allowed:
        raise LlmqError(f"GGUF export of {mt} models supports rotary scaling {', '.join(allowed)}, not {kind!r}")


def rope_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """The rotary parameters of the global-attention layers (Gemma 3 keeps one set per layer type)."""
    rope = cfg.get("rope_parameters") or {}
    return rope.get("full_attention", rope)


def head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def llama3_rope_factors(rope: dict[str, Any], dim: int, base: float) -> torch.Tensor:
    """Llama 3.1's frequency-dependent rotary scaling as llama.cpp takes it (rope_freqs.weight): one
    divisor per frequency.  Wavelengths shorter than original_context / high_freq_factor keep their
    frequency, longer than original_context / low_freq_factor are slowed by `factor`, and those
    between are interpolated in 1/divisor."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * torch.pi / inv_freq
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    ctx = rope["original_max_position_embeddings"]
    smooth = (ctx / wavelen - low) / (high - low)
    keep = torch.where(wavelen < ctx / high, 1.0, torch.where(wavelen > ctx / low, 1.0 / factor, (1 - smooth) / factor + smooth))
    return (1.0 / keep).float()


# llama.cpp hard-codes what Gemma 2/3 configs spell out: every n-th layer attends globally, the others
# in a sliding window; the 27B sizes (told apart by layer count) scale attention by hidden/heads.
GEMMA_SWA = {"gemma2": 2, "gemma3_text": 6}
LLAMA_CPP_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # by GGUF architecture


def llama_cpp_attention_scalar(gguf_arch: str, n_layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """What llama.cpp's Gemma 2/3 graphs divide q by the square root of (HF: query_pre_attn_scalar)."""
    return hidden // heads if n_layers == LLAMA_CPP_27B_LAYERS.get(gguf_arch) else head_dim


def _check_gemma(cfg: dict[str, Any]) -> None:
    mt, n = cfg["model_type"], cfg["num_hidden_layers"]
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    theirs = llama_cpp_attention_scalar(GGUF_ARCHS[mt], n, hidden, heads, head_dim(cfg))
    if cfg.get("query_pre_attn_scalar", theirs) != theirs:
        raise LlmqError(f"llama.cpp scales this {mt} model's attention by 1/sqrt({theirs}), but its query_pre_attn_scalar "
                        f"is {cfg['query_pre_attn_scalar']}; GGUF would compute another model")
    period = GEMMA_SWA[mt]
    want = ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(n)]
    if cfg.get("layer_types") not in (None, want):
        raise LlmqError(f"llama.cpp's {mt} graph puts a global-attention layer every {period} layers; "
                        f"this model's layer_types differ")
    rope = cfg.get("rope_parameters") or {}
    local = rope.get("sliding_attention", {})
    if mt == "gemma3_text" and (local.get("rope_type", "default") != "default" or local.get("rope_theta", 10000.0) != 10000.0):
        raise LlmqError("llama.cpp's gemma3 graph uses plain rotary with base 10000 in its sliding-window layers; "
                        f"this model has {local}")


# llama.cpp's MoE graphs hard-code what transformers' configs leave open: whether the top-k routing
# weights are renormalised to sum to 1 (Mixtral always does), and that every layer is a MoE layer.
MOE_ROUTING = {"mixtral": True, "qwen3_moe": True, "qwen2_moe": False}


def _check_moe(cfg: dict[str, Any]) -> None:
    mt = cfg["model_type"]
    norm = MOE_ROUTING[mt]
    if mt != "mixtral" and bool(cfg.get("norm_topk_prob", False)) != norm:
        raise LlmqError(f"llama.cpp's {GGUF_ARCHS[mt]} graph {'renormalises' if norm else 'does not renormalise'} the top-k "
                        f"routing weights; this model's norm_topk_prob is {cfg.get('norm_topk_prob')}")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise LlmqError(f"llama.cpp's {GGUF_ARCHS[mt]} graph has experts in every layer; this model has dense MLP layers "
                        "(mlp_only_layers / decoder_sparse_step)")
    if mt == "qwen2_moe" and cfg.get("tie_word_embeddings"):
        raise LlmqError("llama.cpp's qwen2moe graph needs an output head of its own; this model's lm_head is tied")


def rotary_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row order turning HF q/k weights into llama.cpp's (interleaved halves per head)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def neox_qkv_order(rows: int, heads: int) -> torch.Tensor:
    """GPT-NeoX fuses q, k, v per head ([h0: q k v, h1: q k v, ...]); llama.cpp wants [q; k; v]."""
    return torch.arange(rows).reshape(heads, 3, rows // heads // 3).transpose(0, 1).reshape(-1)


def row_order(cfg: dict[str, Any], hf_name: str, rows: int) -> torch.Tensor | None:
    """How llama.cpp orders the rows of this tensor differently from the HF checkpoint (None: it does not)."""
    heads = cfg["num_attention_heads"]
    if cfg["model_type"] in PERMUTE_QK:
        if ".q_proj." in hf_name:
            return rotary_row_order(rows, heads)
        if ".k_proj." in hf_name:
            return rotary_row_order(rows, cfg.get("num_key_value_heads") or heads)
    if cfg["model_type"] == "gpt_neox" and ".query_key_value." in hf_name:
        return neox_qkv_order(rows, heads)
    return None


def stored_float(cfg: dict[str, Any], gname: str, t: torch.Tensor) -> torch.Tensor:
    """A float tensor as llama.cpp's graph reads it (after row_order): the one place that knows
    Gemma's norms are stored as 1 + w."""
    t = t.float()
    if cfg["model_type"] in NORM_PLUS_ONE and gname.endswith("norm.weight"):
        t = t + 1
    if gname.endswith("ffn_gate_inp_shexp.weight"):  # the shared expert's one-output gate: a vector to llama.cpp
        t = t.reshape(-1)
    return t


def _file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    special = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
               "Q4_K": LlamaFileType.MOSTLY_Q4_K_S, "Q5_K": LlamaFileType.MOSTLY_Q5_K_S, "Q3_K": LlamaFileType.MOSTLY_Q3_K_S}
    return special[gguf_type] if gguf_type in special else LlamaFileType[f"MOSTLY_{gguf_type}"]


# The metadata key of a file's provenance (llmq.provenance.embedded, as JSON): where it came from and how it
# was made, which a checkpoint directory keeps in llmq_provenance.json beside its weights.
PROVENANCE_KEY = "llmq.provenance"


def add_metadata(w, cfg: dict[str, Any], name: str, gguf_type: str) -> None:
    hidden, heads, hd = cfg["hidden_size"], cfg["num_attention_heads"], head_dim(cfg)
    rope_params = rope_of(cfg)
    rope = rope_params.get("rope_theta") or cfg.get("rope_theta") or cfg.get("rotary_emb_base") or 10000.0
    # Phi-3.5/4-mini and GPT-NeoX rotate only part of each head
    partial = cfg.get("partial_rotary_factor") or rope_params.get("partial_rotary_factor") or cfg.get("rotary_pct") or 1.0
    w.add_name(name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    w.add_rope_freq_base(float(rope))
    w.add_rope_dimension_count(int(hd * partial))
    w.add_key_length(hd)  # always: llama.cpp's default (hidden / heads) is not every family's
    w.add_value_length(hd)
    if "layer_norm_eps" in cfg:  # LayerNorm families (GPT-NeoX, Phi-2)
        w.add_layer_norm_eps(float(cfg["layer_norm_eps"]))
        if cfg["model_type"] == "gpt_neox":  # attention and MLP side by side, or one after the other
            w.add_parallel_residual(bool(cfg.get("use_parallel_residual", True)))
    else:
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if rope_params.get("rope_type") == "linear":  # (llama3's scaling is a tensor, rope_freqs)
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope_params["factor"]))
    if cfg["model_type"] in GEMMA_SWA:
        w.add_sliding_window(int(cfg.get("sliding_window") or cfg.get("max_position_embeddings", 2048)))
        for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                         ("final_logit_softcapping", w.add_final_logit_softcapping)):
            if cfg.get(key):
                add(float(cfg[key]))
    n_expert, n_used = expert_counts(cfg)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_used)
        if cfg.get("moe_intermediate_size"):  # Mixtral's experts are intermediate_size wide
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(_file_type(gguf_type))
