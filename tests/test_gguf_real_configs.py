"""GGUF files of real configurations compute the HF model's function in llama.cpp.

Each JSON file in tests/gguf_configs/ copies the config.json of a published flagship model of a family llmq
writes to GGUF (heads, KV heads, head size, hidden size, rotary bases and scaling, norms, sliding windows,
soft-caps, biases and tied heads as published); only depth, MLP/expert widths, expert count and vocabulary are
reduced.  The model gets random weights drawn so that its predictions are confident (a near-uniform
output would hide any error), llmq writes an F32 file, and llama.cpp's logits are compared with
transformers': top-1 agreement >= 99% and mean KL <= 1e-3 (optional llama-cpp-python extra).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REF6M, ROOT, need
from llmq.export import export_gguf

CONFIGS = sorted((ROOT / "tests" / "gguf_configs").glob("*.json"))
VOCAB = 4096  # llmq-ref-6m's tokenizer


def real_config(path: Path):
    """The published config with the reductions of its file, and llmq-ref-6m's vocabulary."""
    from transformers import AutoConfig

    spec = json.loads(path.read_text())
    values = {k: v for k, v in spec["config"].items() if k != "architectures"}
    values.update(spec["reduced"], vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return AutoConfig.for_model(**values)


def save_confident_model(config, path: Path, seq: int) -> torch.Tensor:
    """Random weights, norms and routers drawn away from their identity/uniform init (so that a norm stored
    the wrong way or a misrouted expert shows), the head scaled until logits spread by ~4 nats; saved with
    llmq-ref-6m's tokenizer.  Returns token ids to compare on."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    gemma = config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if gemma else 1.0))
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
            elif ".gate.weight" in name or "router" in name:
                p.normal_(0, 0.2)
        ids = torch.randint(3, VOCAB, (1, seq), generator=torch.Generator().manual_seed(1))
        head = model.get_output_embeddings().weight
        head.mul_(4.0 / model(ids).logits.float().std().item())
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(need(REF6M) / f, path / f)
    return ids[0]


def llama_cpp_logits(gguf_file: Path, ids: torch.Tensor) -> torch.Tensor:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=max(512, len(ids)), n_batch=len(ids), logits_all=True,
                          verbose=False)
    llm.eval(ids.tolist())
    out = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    del llm
    return out


def agreement(want: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(mean KL(want || got) per position, top-1 agreement) of two (positions, vocab) logit tables."""
    lw, lg = F.log_softmax(want.float(), -1), F.log_softmax(got.float(), -1)
    kl = (lw.exp() * (lw - lg)).sum(-1).mean().item()
    return kl, (want.argmax(-1) == got.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_llama_cpp_computes_the_real_configuration(tmp_path, path):
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    config = real_config(path)
    window = getattr(config, "sliding_window", None)
    seq = 640 if config.model_type.startswith("gemma3") and window and window < 600 else 128  # past Gemma 3's window
    ids = save_confident_model(config, tmp_path / "src", seq)
    export_gguf(str(tmp_path / "src"), tmp_path / "m.gguf", "F32")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    assert want.std() > 2  # confident enough that a wrong function shows
    kl, top1 = agreement(want, llama_cpp_logits(tmp_path / "m.gguf", ids))
    assert kl <= 1e-3 and top1 >= 0.99, (path.stem, kl, top1)
