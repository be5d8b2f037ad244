"""GGUF files for llama.cpp: block packing of GGUF-grid QuantizedTensors, metadata, tokenizer.

Quantized linears arrive as QuantizedTensors whose grid is a GGUF block type (one fp16 d
per block of 32, codes q, w = d * (q - zero)); this module only lays their bytes out as
llama.cpp's blocks.  The container, metadata keys, tensor names and tokenizer tables
come from the `gguf` package.  Llama-family models only (llama, mistral): llama.cpp's
q/k weights use the rotary layout of the original checkpoints, so their rows are permuted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmq.errors import LlmqError
from llmq.qtensor import QuantizedTensor

GGUF_TYPES = ("Q4_0", "Q5_0", "Q8_0", "F16", "F32")
SUPPORTED_ARCHS = ("llama", "mistral")
BLOCK = 32
BLOCK_BYTES = {"q4_0": 2 + 16, "q5_0": 2 + 4 + 16, "q8_0": 2 + 32}  # fp16 d, (5th bits), codes
LINEAR_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def check_arch(config: dict[str, Any]) -> None:
    mt = config.get("model_type")
    if mt not in SUPPORTED_ARCHS:
        raise LlmqError(f"GGUF export supports {', '.join(SUPPORTED_ARCHS)} models, not {mt!r}")


def pack_blocks(qt: QuantizedTensor) -> np.ndarray:
    """The raw GGUF blocks of a (out x in) linear quantized on a GGUF grid: uint8 (out, in/32 * bytes)."""
    grid = qt.spec.grid
    out, inp = qt.shape
    q = qt.codes.to(torch.int16).reshape(out * inp // BLOCK, BLOCK).numpy()
    d = qt.scales.reshape(-1).numpy().astype(np.float16).view(np.uint8).reshape(-1, 2)
    if grid == "q8_0":
        body = (q - 128).astype(np.int8).view(np.uint8)
    elif grid == "q4_0":
        q = q.astype(np.uint8)
        body = q[:, :16] | (q[:, 16:] << 4)  # byte j: code j low nibble, code j+16 high nibble
    elif grid == "q5_0":
        q = q.astype(np.uint8)
        qh = np.packbits((q >> 4) & 1, axis=-1, bitorder="little")  # bit j of a 32-bit word: 5th bit of code j
        body = np.concatenate([qh, (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)], axis=1)
    else:
        raise LlmqError(f"no GGUF block layout for grid {grid!r}")
    return np.concatenate([d, body], axis=1).reshape(out, -1)


def ggml_type(grid: str):
    from gguf import GGMLQuantizationType

    return {"q4_0": GGMLQuantizationType.Q4_0, "q5_0": GGMLQuantizationType.Q5_0, "q8_0": GGMLQuantizationType.Q8_0}[grid]


def rotary_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row order turning HF q/k weights into llama.cpp's (interleaved halves per head)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def permute_rows(qt: QuantizedTensor, order: torch.Tensor) -> QuantizedTensor:
    return QuantizedTensor(codes=qt.codes[order], scales=qt.scales[order], zeros=qt.zeros[order], g_idx=qt.g_idx, spec=qt.spec)


def _file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    return {"Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q5_0": LlamaFileType.MOSTLY_Q5_0, "Q8_0": LlamaFileType.MOSTLY_Q8_0,
            "F16": LlamaFileType.MOSTLY_F16, "F32": LlamaFileType.ALL_F32}[gguf_type]


def add_metadata(w, cfg: dict[str, Any], name: str, gguf_type: str) -> None:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    w.add_name(name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    w.add_rope_freq_base(float(rope))
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(_file_type(gguf_type))


def add_tokenizer(w, model_dir: Path, vocab_size: int) -> None:
    """tokenizer.ggml.*: SentencePiece-style (llama) or GPT-2-style BPE tables, and special tokens."""
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

    vocab = None
    errors = []
    for cls in (LlamaHfVocab, SentencePieceVocab, BpeVocab):
        try:
            vocab = cls(model_dir)
            break
        except Exception as e:  # each class refuses tokenizers it does not describe
            errors.append(f"{cls.__name__}: {e}")
    if vocab is None:
        raise LlmqError(f"cannot describe the tokenizer of {str(model_dir)!r} in GGUF ({'; '.join(errors)})")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) != vocab_size:
        raise LlmqError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    w.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(w)


def write_gguf(model_dir: Path, out_file: Path, gguf_type: str, tensors, name: str) -> None:
    """Write ``tensors``: an iterable of (hf_name, payload) where payload is a QuantizedTensor or a float tensor.

    Written to a temporary file beside ``out_file`` and renamed when complete.
    """
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    check_arch(cfg)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    tmp = out_file.with_name(f".{out_file.name}.llmq-tmp")
    try:
        w = gguf.GGUFWriter(str(tmp), "llama", use_temp_file=True)
        add_metadata(w, cfg, name, gguf_type)
        add_tokenizer(w, model_dir, cfg["vocab_size"])
        float_dtype = np.float32 if gguf_type == "F32" else np.float16
        for hf_name, payload in tensors:
            gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise LlmqError(f"no GGUF name for tensor {hf_name!r}")
            heads_here = heads if ".q_proj." in hf_name else kv if ".k_proj." in hf_name else None
            if isinstance(payload, QuantizedTensor):
                if heads_here:
                    payload = permute_rows(payload, rotary_row_order(payload.shape[0], heads_here))
                w.add_tensor(gname, pack_blocks(payload), raw_dtype=ggml_type(payload.spec.grid))  # shape from the byte shape
            else:
                t = payload.float()
                if heads_here:
                    t = t[rotary_row_order(t.shape[0], heads_here)]
                # Norms (1-D) stay F32, as llama.cpp expects; other float tensors take the file's float type.
                w.add_tensor(gname, t.numpy().astype(np.float32 if t.ndim == 1 else float_dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_file)
    finally:
        if tmp.exists():
            tmp.unlink()
