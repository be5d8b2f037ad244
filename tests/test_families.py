"""Every declared architecture family quantizes, and its checkpoint reloads to the in-memory result."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny
from llmq.arch import ARCHS, arch_for
from llmq.checkpoint import load_model
from llmq.recipe import build_config
from llmq.pipeline import quantize_model
from llmq.source import ModelSource


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "opt", "gpt_neox", "phi3", "gemma2",
                                    "gemma3_text", "olmo2", "exaone4", "cohere", "granite", "stablelm", "starcoder2",
                                    "glm4", "arcee", "apertus", "gpt2"])
def test_family_gptq_roundtrip(tmp_path, family):
    from transformers import AutoModelForCausalLM

    src = save_tiny(family, tmp_path / "src")
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert arch_for(fp) is ARCHS[family]  # the declared table matches the real module names
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = build_config({}, {"method": "gptq", "bits": 8, "group_size": 32, "seqlen": 32, "nsamples": 4, "dtype": "float32"})
    quantize_model(ModelSource(str(src)), cfg, tmp_path / "q", progress=False, calib_ids=ids)
    q, _ = load_model(str(tmp_path / "q"))
    with torch.no_grad():
        a = fp(ids).logits
        b = q(ids).logits
    # 8-bit: the quantized model computes nearly the fp function
    assert torch.allclose(a, b, atol=0.05 * a.abs().max().item())
    changed = [n for n, p in q.named_parameters() if n in dict(fp.named_parameters()) and not torch.equal(p, dict(fp.named_parameters())[n])]
    assert len(changed) == len(ARCHS[family].linears()) * fp.config.num_hidden_layers


def test_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D linears (weights stored in x out) quantize like nn.Linear: AWQ finds both norm
    groups foldable, float tensors keep the source layout, and the checkpoint reloads to the fp model."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = save_tiny("gpt2", tmp_path / "src")
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = build_config({}, {"method": "awq", "bits": 8, "group_size": 32, "seqlen": 32, "nsamples": 4, "dtype": "float32",
                            "skip": ["mlp.c_proj"]})
    quantize_model(ModelSource(str(src)), cfg, tmp_path / "q", progress=False, calib_ids=ids)
    recs = [json.loads(l) for l in (tmp_path / "q" / "llmq_quantize_log.jsonl").read_text().splitlines()]
    assert {r["module"] for r in recs if r.get("alpha", "absent") != "absent"} == {"attn.c_attn", "mlp.c_fc"}
    stored, source = load_file(tmp_path / "q" / "model.safetensors"), load_file(src / "model.safetensors")
    key = next(k for k in source if k.endswith("h.0.mlp.c_proj.weight"))
    assert torch.equal(stored[key], source[key])  # left in float: same (in, out) layout and values
    assert stored[key.replace("mlp.c_proj", "attn.c_attn").replace("weight", "qweight")].shape == (64 * 8 // 32, 3 * 64)
    q, _ = load_model(str(tmp_path / "q"))
    with torch.no_grad():
        a, b = fp(ids).logits, q(ids).logits
    assert torch.allclose(a, b, atol=0.02 * a.abs().max().item())


def test_gptqmodel_decodes_gpt2_checkpoint(tmp_path):
    """GPTQModel (when installed; not a CI dependency) reads llmq's GPT-2 checkpoint to llmq's weights."""
    pytest.importorskip("gptqmodel")
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel

    src = save_tiny("gpt2", tmp_path / "src")
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = build_config({}, {"method": "gptq", "bits": 4, "group_size": 32, "seqlen": 32, "nsamples": 4, "dtype": "float16"})
    quantize_model(ModelSource(str(src)), cfg, tmp_path / "q", progress=False, calib_ids=ids)
    ours, _ = load_model(str(tmp_path / "q"), dtype=torch.float16)
    theirs = GPTQModel.load(str(tmp_path / "q"), device="cpu", dtype=torch.float16, backend=BACKEND.TORCH).model
    for name, mod in ours.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".h." in name:
            lin = theirs.get_submodule(name)
            eye = torch.eye(mod.in_features, dtype=torch.float16)
            with torch.no_grad():
                w = (lin(eye) - (0 if lin.bias is None else lin.bias)).float().T  # the weight its kernel applies
            assert torch.equal(w, mod.weight.float()), name
