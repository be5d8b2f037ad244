"""GGUF files for llama.cpp: block packing of GGUF-grid QuantizedTensors, metadata, tokenizer.

Quantized tensors arrive as QuantizedTensors on a GGUF block grid (grid.GGUF_GRIDS); this
module only lays their bytes out as llama.cpp's blocks: the legacy types (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0: 32 values with an fp16 scale and maybe an fp16 minimum) and the K-quants (Q2_K ...
Q6_K: 256 values with fp16 super-scales and 4/6/8-bit group scales).  The container, metadata
keys, tensor names and tokenizer tables come from the `gguf` package.  Llama-family q/k
weights use the rotary layout of the original checkpoints in llama.cpp, so their rows are
permuted, GPT-NeoX's per-head fused q/k/v rows regrouped; Qwen2/Qwen3, Phi-3 (fused qkv and
gate/up, as llama.cpp wants them) and Phi-2 are written as they are; Gemma's norms are stored
as 1 + w.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmq.errors import LlmqError
from llmq.gguf_plan import GGUF_ARCHS, NORM_PLUS_ONE, PERMUTE_QK, expert_counts, expert_index, tensor_namer
from llmq.grid import split_sub
from llmq.qtensor import QuantizedTensor

LINEAR_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

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


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.float().numpy().astype(np.float16).view(np.uint8).reshape(x.shape[0], 2)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit fields of 128 values per row -> 32 bytes: value j*32 + l in bits 2j of byte l."""
    q = q.reshape(q.shape[0], 4, 32)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def _bitplane(bits: np.ndarray) -> np.ndarray:
    """One bit of 256 values per row -> 32 bytes: value b*32 + l in bit b of byte l."""
    bits = bits.reshape(bits.shape[0], 8, 32).astype(np.uint8)
    return np.bitwise_or.reduce(bits << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)


def pack_blocks(qt: QuantizedTensor) -> np.ndarray:
    """The raw GGUF blocks of an (out x in) tensor quantized on a GGUF grid: uint8 (out, bytes per row).

    Layouts are llama.cpp's block structs (ggml-common.h), byte for byte."""
    grid, bt = qt.spec.grid, qt.spec.block
    if bt is None:
        raise LlmqError(f"no GGUF block layout for grid {grid!r}")
    out, inp = qt.shape
    if inp % bt.unit:
        raise LlmqError(f"{grid} needs rows that are a multiple of {bt.unit}, got {inp}")
    if bt.super_block == 0:
        q = qt.codes.reshape(-1, 32).numpy().astype(np.uint8)
        d = _f16_bytes(qt.scales.reshape(-1))
        m = [_f16_bytes(qt.offsets.reshape(-1))] if bt.has_min else []
        if grid == "q8_0":
            body = [(q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
        elif bt.bits == 4:
            body = [_nibbles(q[:, :16], q[:, 16:])]  # byte j: value j (low nibble), value j+16 (high)
        else:  # 5 bits: the 5th bits as one little-endian 32-bit word, then the low nibbles
            body = [np.packbits((q >> 4) & 1, axis=-1, bitorder="little"), _nibbles(q[:, :16], q[:, 16:])]
        return np.concatenate([d, *m, *body], axis=1).reshape(out, -1)

    nsup = out * inp // 256
    q = qt.codes.reshape(nsup, 256).numpy().astype(np.uint8)
    per = 256 // bt.group
    try:
        d, k = split_sub(qt.scales.reshape(nsup, per), bt)
        if bt.has_min:
            dmin, km = split_sub(-qt.offsets.reshape(nsup, per), bt, signed=False)
    except ValueError as e:
        raise LlmqError(f"cannot pack {grid}: {e}") from None
    d = _f16_bytes(d.reshape(-1))
    k = k.numpy()
    if grid in ("q4_k", "q5_k"):
        sc, mn = k.astype(np.uint8), km.numpy().astype(np.uint8)
        scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                                 _nibbles(sc[:, 4:], mn[:, 4:])], axis=1)
        chunks = q.reshape(nsup, 4, 2, 32)  # 64 values per chunk: the first 32 low nibbles, the next 32 high
        qs = _nibbles(chunks[:, :, 0], chunks[:, :, 1]).reshape(nsup, 128)
        qh = [_bitplane(q >> 4)] if grid == "q5_k" else []
        blocks = [d, _f16_bytes(dmin.reshape(-1)), scales, *qh, qs]
    elif grid == "q6_k":
        halves = q.reshape(nsup, 2, 2, 64)  # per 128 values: low nibbles of the first 64, then of the next 64
        ql = _nibbles(halves[:, :, 0], halves[:, :, 1]).reshape(nsup, 128)
        qh = np.concatenate([_crumbs(q[:, :128] >> 4), _crumbs(q[:, 128:] >> 4)], axis=1)
        blocks = [ql, qh, k.astype(np.int8).view(np.uint8), d]
    elif grid == "q3_k":
        s = (k + 32).astype(np.uint8)  # 6-bit scales, stored with a bias of 32
        low = _nibbles(s[:, :8], s[:, 8:])
        high = (s >> 4) & 3
        high = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
        qs = np.concatenate([_crumbs(q[:, :128] & 3), _crumbs(q[:, 128:] & 3)], axis=1)
        blocks = [_bitplane(q >> 2), qs, low, high, d]
    elif grid == "q2_k":
        scales = _nibbles(k.astype(np.uint8), km.numpy().astype(np.uint8))
        qs = np.concatenate([_crumbs(q[:, :128]), _crumbs(q[:, 128:])], axis=1)
        blocks = [scales, qs, d, _f16_bytes(dmin.reshape(-1))]
    else:
        raise LlmqError(f"no GGUF block layout for grid {grid!r}")
    return np.concatenate(blocks, axis=1).reshape(out, -1)


def ggml_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


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


def _file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    special = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
               "Q4_K": LlamaFileType.MOSTLY_Q4_K_S, "Q5_K": LlamaFileType.MOSTLY_Q5_K_S, "Q3_K": LlamaFileType.MOSTLY_Q3_K_S}
    return special[gguf_type] if gguf_type in special else LlamaFileType[f"MOSTLY_{gguf_type}"]


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


def load_vocab(model_dir: Path):
    """The tokenizer as gguf describes it; a clear error when it cannot (checked before any work)."""
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    errors = []
    for cls in (LlamaHfVocab, SentencePieceVocab, BpeVocab):
        try:
            return cls(model_dir)
        except Exception as e:  # each class refuses tokenizers it does not describe
            errors.append(f"{cls.__name__}: {e}")
    raise LlmqError(f"cannot describe the tokenizer of {str(model_dir)!r} in GGUF ({'; '.join(errors)})")


# llama.cpp picks its pre-tokenizer (the regex splitting text before BPE) by this name.
PRE_TOKENIZER = {"qwen2": "qwen2", "qwen3": "qwen2", "gpt2": "gpt-2"}


def add_tokenizer(w, model_dir: Path, vocab_size: int, model_type: str = "llama") -> None:
    """tokenizer.ggml.*: SentencePiece-style (llama) or GPT-2-style BPE tables, and special tokens."""
    from gguf.vocab import SpecialVocab

    vocab = load_vocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) != vocab_size:
        raise LlmqError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    w.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        w.add_tokenizer_pre(PRE_TOKENIZER.get(model_type, "default"))
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(w)


def _tensor_data(cfg: dict[str, Any], hf_name: str, gname: str, payload, ttype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGUF type or None) of one tensor as the file stores it: blocks of a QuantizedTensor,
    else the float tensor in ``ttype``, rows in llama.cpp's order."""
    import gguf
    from gguf.quants import quantize as gguf_quantize

    order = row_order(cfg, hf_name, payload.shape[0])
    if isinstance(payload, QuantizedTensor):
        if order is not None:
            payload = payload.rows(order)
        return pack_blocks(payload), ggml_type(payload.spec.grid)  # the writer takes the shape from the byte shape
    t = payload.float()
    if order is not None:
        t = t[order]
    if cfg["model_type"] in NORM_PLUS_ONE and gname.endswith("norm.weight"):
        t = t + 1
    if gname.endswith("ffn_gate_inp_shexp.weight"):  # the shared expert's one-output gate: a vector to llama.cpp
        t = t.reshape(-1)
    if ttype == "BF16":
        return gguf_quantize(t.numpy(), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return t.numpy().astype(np.float32 if ttype == "F32" else np.float16), None


def write_gguf(model_dir: Path, cfg: dict[str, Any], out_file: Path, gguf_type: str, tensors, name: str) -> None:
    """Write ``tensors``: an iterable of (hf_key, payload, type) where payload is a QuantizedTensor
    (type: its grid) or a float tensor written as ``type`` (F32, F16 or BF16).  ``cfg``: the
    model's config.json (architecture checked by the caller); ``model_dir`` holds the tokenizer.

    Written to a temporary file beside ``out_file`` and renamed when complete.
    """
    import gguf

    gguf_name = tensor_namer(cfg)
    tmp = out_file.with_name(f".{out_file.name}.llmq-tmp")
    try:
        w = gguf.GGUFWriter(str(tmp), GGUF_ARCHS[cfg["model_type"]], use_temp_file=True)
        add_metadata(w, cfg, name, gguf_type)
        add_tokenizer(w, model_dir, cfg["vocab_size"], cfg["model_type"])
        rope = rope_of(cfg)
        if rope.get("rope_type") == "llama3":
            w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim(cfg), float(rope["rope_theta"])).numpy())
        n_expert, _ = expert_counts(cfg)
        experts: dict[str, dict[int, tuple[np.ndarray, Any]]] = {}  # stacked name -> expert -> (data, raw type)
        for hf_name, payload, ttype in tensors:
            gname = gguf_name(hf_name)
            if gname is None:
                raise LlmqError(f"no GGUF name for tensor {hf_name!r}")
            data, raw = _tensor_data(cfg, hf_name, gname, payload, ttype)
            stacked = expert_index(hf_name)
            if stacked is None:
                w.add_tensor(gname, data, raw_dtype=raw)
                continue
            # an expert's projection waits until its layer's others arrive: llama.cpp holds them stacked
            have = experts.setdefault(gname, {})
            have[stacked[1]] = (data, raw)
            if len(have) == n_expert:
                if sorted(have) != list(range(n_expert)) or len({(d.shape, r) for d, r in have.values()}) != 1:
                    raise LlmqError(f"{gname}: the experts' tensors differ in index, shape or type")
                w.add_tensor(gname, np.stack([have[e][0] for e in range(n_expert)]), raw_dtype=have[0][1])
                del experts[gname]
        if experts:
            gname, have = next(iter(experts.items()))
            raise LlmqError(f"{gname}: {len(have)} of the model's {n_expert} experts found")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_file)
    finally:
        if tmp.exists():
            tmp.unlink()
