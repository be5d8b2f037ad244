"""GGUF export: checked with the `gguf` package's reader, dequantizer and reference quantizer, and
transformers' GGUF loader (none of them llmq code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import C4, REF6M, need, save_tiny
from llmq.checkpoint import iter_quantized, load_model, quantization_config_of
from llmq.config import build_config
from llmq.errors import LlmqError
from llmq.export import export_gguf, quantize_to_gguf
from llmq.formats.gguf import rotary_row_order
from llmq.pipeline import quantize_model
from llmq.source import ModelSource

TYPES = ["Q4_0", "Q5_0", "Q8_0"]
HEADS, KV = 4, 2  # llmq-ref-6m


def _gguf_tensors(path):
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(str(path))
    return {t.name: (t, dequantize(t.data, t.tensor_type)) for t in r.tensors}


def _gguf_name(hf: str) -> str:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 6).get_name(hf, try_suffixes=(".weight",))


def _permuted(name: str, w: torch.Tensor) -> torch.Tensor:
    heads = HEADS if ".q_proj." in name else KV if ".k_proj." in name else None
    return w[rotary_row_order(w.shape[0], heads)] if heads else w


@pytest.mark.parametrize("gtype", ["Q4_0", pytest.param("Q5_0", marks=pytest.mark.slow), pytest.param("Q8_0", marks=pytest.mark.slow)])
def test_gptq_values_survive_gguf_dequantizer(tmp_path, gtype):
    """The values GPTQ chose on the block grid are exactly what gguf's own dequantizer reads back."""
    need(REF6M)
    cfg = build_config({}, {"method": "gptq", "format": "gptq_v2", "gguf_type": gtype, "dataset": str(need(C4)),
                            "nsamples": 8, "seqlen": 128, "dtype": "float32"})
    stage = tmp_path / "stage"
    quantize_model(ModelSource(str(REF6M)), cfg, stage, progress=False)
    out = tmp_path / "m.gguf"
    export_gguf(str(stage), out, gtype)
    read = _gguf_tensors(out)
    src = ModelSource(str(stage))
    qcfg = quantization_config_of(src)
    delattr(src.config, "quantization_config")
    n = 0
    for mod_name, qt in iter_quantized(src.skeleton(), src, qcfg):
        assert qt.spec.grid == gtype.lower()
        t, values = read[_gguf_name(mod_name + ".weight")]
        assert t.tensor_type.name == gtype
        assert np.array_equal(values.reshape(qt.shape), _permuted(mod_name + ".weight", qt.dequantize()).numpy())
        n += 1
    assert n == 6 * 7
    assert read["token_embd.weight"][0].tensor_type.name == "F16" and read["output_norm.weight"][0].tensor_type.name == "F32"


@pytest.mark.parametrize("gtype", TYPES)
def test_rtn_is_byte_identical_to_gguf_reference(tmp_path, gtype):
    import gguf
    from gguf.quants import quantize as reference
    from safetensors.torch import load_file

    need(REF6M)
    out = tmp_path / "rtn.gguf"
    export_gguf(str(REF6M), out, gtype)
    r = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    weights = load_file(REF6M / "model.safetensors")
    checked = 0
    for name, w in weights.items():
        if ".layers." in name and name.endswith("proj.weight"):
            expected = reference(_permuted(name, w).numpy(), gguf.GGMLQuantizationType[gtype])
            assert np.array_equal(np.asarray(r[_gguf_name(name)].data), expected), name
            checked += 1
    assert checked == 42


def test_gguf_loads_in_transformers_and_matches(tmp_path):
    """transformers' GGUF loader (it undoes the q/k permutation itself) computes llmq's dequantized model."""
    from transformers import AutoModelForCausalLM

    need(REF6M)
    cfg = build_config({}, {"method": "rtn", "format": "gptq_v2", "gguf_type": "Q4_0", "dtype": "float32"})
    quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "stage", progress=False)
    export_gguf(str(tmp_path / "stage"), tmp_path / "m.gguf", "Q4_0")
    ours, _ = load_model(str(tmp_path / "stage"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    # embeddings are F16 in the file and F32 in the staging checkpoint: agreement to fp16 precision
    assert torch.allclose(a, b, atol=2e-2 * a.abs().max().item())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97


def test_llama_cpp_loads_every_type(tmp_path):
    """With the optional llama-cpp-python extra: llama.cpp itself loads each exported type."""
    llama_cpp = pytest.importorskip("llama_cpp")
    need(REF6M)
    for gtype in (*TYPES, "F16"):
        out = tmp_path / f"{gtype}.gguf"
        export_gguf(str(REF6M), out, gtype)
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False)
        assert llm.n_vocab() == 4096


def test_unsupported_architecture_writes_nothing(tmp_path):
    src = save_tiny("gpt_neox", tmp_path / "neox")
    cfg = build_config({}, {"method": "rtn", "format": "gguf", "gguf_type": "Q4_0"})
    with pytest.raises(LlmqError, match="GGUF export supports"):
        quantize_to_gguf(ModelSource(str(src)), cfg, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neox"]


def test_gguf_needs_a_type():
    with pytest.raises(LlmqError, match="--gguf-type"):
        build_config({}, {"format": "gguf"})
