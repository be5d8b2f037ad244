"""Every declared architecture family quantizes, and its checkpoint reloads to the in-memory result."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny
from llmq.arch import ARCHS, arch_for
from llmq.checkpoint import load_model
from llmq.config import build_config
from llmq.pipeline import quantize_model
from llmq.source import ModelSource


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "opt", "gpt_neox", "phi3", "gemma2",
                                    "gemma3_text", "olmo2", "exaone4", "cohere", "granite", "stablelm", "starcoder2",
                                    "glm4", "arcee", "apertus"])
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
