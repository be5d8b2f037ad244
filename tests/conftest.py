from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLMQ_ASSETS", ROOT.parent / "shared" / "assets"))
STORIES = ASSETS / "models" / "stories260K"
REF6M = ASSETS / "models" / "llmq-ref-6m"
TINYSTORIES = ASSETS / "datasets" / "tinystories" / "valid-sample.txt"
WIKI_TEST = ASSETS / "datasets" / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet"
C4 = ASSETS / "datasets" / "c4-sample" / "c4_sample_200docs.jsonl"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared asset {path} is not available")
    return path


def tiny_config(model_type: str, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 128):
    """A small random config of a supported family, built from transformers' own config classes."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=inter, max_position_embeddings=256, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type not in ("opt", "gpt_neox", "phi"):
        common.update(num_key_value_heads=2)
    if model_type in ("qwen3", "gemma", "gemma2", "gemma3_text", "helium", "apertus"):
        common.update(head_dim=16)
    if model_type == "opt":
        common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      ffn_dim=inter, max_position_embeddings=256, word_embed_proj_dim=hidden,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gpt_neox":
        common.update(rotary_pct=0.5)
    if model_type == "gpt2":  # Conv1D linears; its config names the sizes its own way
        common = dict(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_inner=inter, n_positions=256,
                      bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(model_type, **common)


def save_tiny(model_type: str, path: Path, seed: int = 0, **kw) -> Path:
    """Save a randomly initialised model of that family: config.json, generation_config.json and fp32
    safetensors, no tokenizer (tests that need one pass calibration ids or copy tokenizer files)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw))
    model.save_pretrained(path)
    return path


def layer_inputs(model, ids, batch_size: int = 2):
    """(arch, LayerInputs at layer 0) of a model run on ``ids``, as the pipeline captures them."""
    from llmq.activations import LayerInputs
    from llmq.arch import arch_for, get_module

    arch = arch_for(model)
    layer0 = get_module(model, arch.layers)[0]
    seen: dict = {}
    hidden = []

    def grab(_m, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])
        seen.setdefault("kw", {k: v for k, v in kwargs.items() if k != "hidden_states"})

    # One sample per forward, as the pipeline captures: masks and rotary tables then have batch 1 and
    # broadcast over any batch (an eager attention's mask would not, if captured from a batch of 4).
    h = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        for row in ids:
            model(row[None], use_cache=False)
    h.remove()
    return arch, LayerInputs(hidden=hidden, kwargs=seen["kw"], batch_size=batch_size)


@pytest.fixture
def stories() -> Path:
    return need(STORIES)


@pytest.fixture
def tinystories_text() -> Path:
    return need(TINYSTORIES)
