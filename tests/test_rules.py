"""Per-module precision rules: parsing, the checks before any work, and every format carrying them the way
its readers (llmq's, transformers', GPTQModel's, llama.cpp's) read them back.

The reference for every quantized module is round-to-nearest of the source weight on the grid the rule
names, computed here from the checkpoint with rtn_quantize: an RTN run must store exactly that."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import REF6M, need
from llmq.checkpoint import load_model
from llmq.errors import LlmqError
from llmq.grid import IntGrid
from llmq.pipeline import quantize_model
from llmq.recipe import build_config
from llmq.rounding import rtn_quantize
from llmq.rules import Rule, first_match, parse_flag, parse_rules
from llmq.source import ModelSource


# ---- parsing -------------------------------------------------------------------------------------

def test_flag_parsing():
    assert parse_flag("down_proj=bits:8,group_size:64") == {"match": "down_proj", "bits": 8, "group_size": 64}
    assert parse_flag(r"layers\.0\.=keep") == {"match": r"layers\.0\.", "keep": True}
    assert parse_flag("v_proj=type:q6_k") == {"match": "v_proj", "type": "q6_k"}
    # the spec is split at the last '=', so a lookahead in the regex survives
    assert parse_flag("q(?=_proj)=sym:false") == {"match": "q(?=_proj)", "sym": False}
    for bad in ("down_proj", "=bits:8", "down_proj=bits:eight", "down_proj=width:8", "x=sym:maybe"):
        with pytest.raises(LlmqError):
            parse_flag(bad)


def test_rule_validation():
    for bad in ({"match": "x"}, {"match": "x", "keep": True, "bits": 4}, {"match": "(", "bits": 4},
                {"match": "x", "bits": "4"}, {"match": "x", "bits": True}, {"bits": 4}, {"match": "x", "colour": 1}):
        with pytest.raises(LlmqError):
            parse_rules([bad])
    rules = parse_rules([{"match": "mlp", "bits": 8}, {"match": "down_proj", "keep": True}])
    assert first_match(rules, "model.layers.0.mlp.down_proj").bits == 8  # first match wins
    assert first_match(rules, "model.layers.0.self_attn.q_proj") is None
    assert Rule("x", type="Q6_K").to_dict() == {"match": "x", "type": "Q6_K"}


@pytest.mark.parametrize("over,why", [
    ({"format": "gguf", "gguf_type": "Q4_K", "rules": ["down=bits:8"]}, "GGUF"),
    ({"format": "awq", "rules": ["down=bits:8"]}, "one grid"),
    ({"format": "bitsandbytes", "rules": ["down=group_size:32"]}, "one grid"),
    ({"rules": ["down=type:q8_0"]}, "--format gguf"),
    ({"rules": ["down=sym:false"]}, "gptq_v2"),  # v1 cannot store the zero points of an asymmetric rule
    ({"rules": ["down=bits:5"]}, "bits"),
    ({"method": "fp16", "rules": ["down=bits:8"]}, "casts"),
    ({"format": "gguf", "gguf_type": "Q4_K", "rules": ["down=type:q9_k"]}, "type"),
])
def test_rules_a_format_cannot_carry_are_refused(over, why):
    with pytest.raises(LlmqError, match=why):
        build_config({}, {"method": "rtn", **over})


def test_keep_rules_are_fine_for_single_grid_formats():
    for fmt in ("awq", "bitsandbytes"):
        build_config({}, {"method": "rtn", "format": fmt, "bits": 4, "rules": ["down_proj=keep"]})


def test_command_line_rules_come_first():
    cfg = build_config({"rules": [{"match": "down_proj", "bits": 8}]}, {"rules": ["down_proj=bits:2"]})
    assert parse_rules(cfg.rules)[0].bits == 2


# ---- against the model ------------------------------------------------------------------------------

def _rtn(tmp_path, fmt, rules, **over):
    need(REF6M)
    cfg = build_config({}, {"method": "rtn", "bits": 4, "group_size": 128, "format": fmt, "rules": rules,
                            "dtype": "float32", "grid_search": False, **over})  # (min/max, as the reference RTN)
    return quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "q", progress=False).output


def test_rules_naming_nothing_or_splitting_fused_siblings_are_refused(tmp_path):
    with pytest.raises(LlmqError, match="matches no"):
        _rtn(tmp_path, None, ["qq_proj=bits:8"])
    with pytest.raises(LlmqError, match="fuse"):
        _rtn(tmp_path, None, ["q_proj=bits:8"])  # k/v of the same layer keep 4 bits
    with pytest.raises(LlmqError, match="matches no"):
        _rtn(tmp_path, "compressed-tensors", ["^lm_head$=bits:8"])  # its readers want a float head
    assert not (tmp_path / "q").exists()


RULES = [r"layers\.0\.mlp\.down_proj=keep", "down_proj=bits:8,group_size:-1",
         r"layers\.5\.self_attn\.[qkvo]_proj=bits:3,group_size:64"]


def _expected_grid(module: str) -> IntGrid | None:
    if module == "model.layers.0.mlp.down_proj":
        return None
    if module.endswith("down_proj"):
        return IntGrid(8, -1, True)
    if module.startswith("model.layers.5.self_attn"):
        return IntGrid(3, 64, True)
    return IntGrid(4, 128, True)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_mixed_checkpoint_holds_each_rules_grid(tmp_path, fmt):
    """Every linear read back equals round-to-nearest of the source weight on the grid its rule names;
    a kept linear is stored as a plain weight."""
    out = _rtn(tmp_path, fmt, RULES)
    ours, _ = load_model(str(out))
    src = ModelSource(str(REF6M))
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        keys = set(st.keys())
    for name, mod in ours.named_modules():
        if not name.endswith("proj"):
            continue
        grid = _expected_grid(name)
        w = src.load_tensor(f"{name}.weight").float()
        want = w if grid is None else rtn_quantize(w, grid).dequantize()
        assert torch.equal(mod.weight.data, want), name
        assert (f"{name}.weight" in keys) == (grid is None), name


def test_gptq_dynamic_names_what_runtimes_look_up(tmp_path):
    """GPTQModel / vLLM semantics (re.match, first entry wins, '-:' excludes), implemented independently
    here, give every linear of the file its rule's grid; fused runtime names (qkv_proj) are covered."""
    import re

    out = _rtn(tmp_path, "gptq", RULES)
    q = json.loads((out / "config.json").read_text())["quantization_config"]

    def lookup(name):
        for pattern, over in q["dynamic"].items():
            if re.match(pattern.removeprefix("-:").removeprefix("+:"), name):
                return None if pattern.startswith("-:") else IntGrid(over.get("bits", q["bits"]),
                                                                     over.get("group_size", q["group_size"]), q["sym"])
        return IntGrid(q["bits"], q["group_size"], q["sym"])

    for i in range(6):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{m}"
            assert lookup(name) == _expected_grid(name), name
    assert lookup("model.layers.5.self_attn.qkv_proj") == IntGrid(3, 64, True)
    assert lookup("model.layers.4.self_attn.qkv_proj") == IntGrid(4, 128, True)


def test_compressed_tensors_mixed_loads_in_transformers(tmp_path):
    """transformers + compressed-tensors compute bitwise llmq's logits from a file with several config groups."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = _rtn(tmp_path, "compressed-tensors", RULES)
    ours, _ = load_model(str(out))
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


def test_gptqmodel_loads_mixed_bits_and_a_quantized_head(tmp_path):
    """GPTQModel (when installed; not a CI dependency) applies the weights llmq stores, 8-bit head included."""
    pytest.importorskip("gptqmodel")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel

    out = _rtn(tmp_path, "gptq", [*RULES, "^lm_head$=bits:8"], dtype="float16")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["lm_head"] is True
    ours, _ = load_model(str(out))
    theirs = GPTQModel.load(str(out), device="cpu", dtype=torch.float16, backend=BACKEND.TORCH).model
    for name, mod in ours.named_modules():
        if name.endswith("proj") or name == "lm_head":
            eye = torch.eye(mod.in_features, dtype=torch.float16)
            with torch.no_grad():
                w = theirs.get_submodule(name)(eye).float().T
            assert torch.equal(w, mod.weight.half().float()), name


def test_gguf_rules_set_tensor_types(tmp_path):
    import gguf

    need(REF6M)
    cfg = build_config({}, {"method": "rtn", "format": "gguf", "gguf_type": "Q4_K",
                            "rules": ["down_proj=type:q8_0", r"layers\.1\.self_attn=keep", "embed_tokens=type:q6_k"]})
    out = quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "m.gguf", progress=False).output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] == "Q6_K" and types["output.weight"] == "Q6_K"
    for i in range(6):
        assert types[f"blk.{i}.ffn_down.weight"] == "Q8_0"
        assert types[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_q.weight"] == ("F16" if i == 1 else "Q4_K")


def test_llama_cpp_runs_a_mixed_gguf(tmp_path):
    """llama.cpp (when installed) computes from a mixed file what llmq's reader of the same file does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llmq.checkpoint import load_for_eval

    need(REF6M)
    cfg = build_config({}, {"method": "rtn", "format": "gguf", "gguf_type": "Q4_K",
                            "rules": ["down_proj=type:q8_0", r"layers\.0\.=type:q2_k", "v_proj=type:q6_k"]})
    out = quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "m.gguf", progress=False).output
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False)
    model, _, _ = load_for_eval(str(out))
    ids = torch.randint(3, 4096, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    assert (got - want).abs().max() / want.abs().max() < 0.02
