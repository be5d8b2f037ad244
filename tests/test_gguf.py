"""GGUF export: checked with the `gguf` package's reader, dequantizer and reference quantizer, and
transformers' GGUF loader (none of them llmq code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import C4, REF6M, need, save_tiny, tiny_config
from llmq.checkpoint import load_for_eval, load_model
from llmq.errors import LlmqError
from llmq.export import export_gguf
from llmq.gguf.model import rotary_row_order
from llmq.gguf.plan import GGUFPlan
from llmq.gguf.types import BLOCK_TYPES
from llmq.gguf.writer import GGUFSink
from llmq.methods.gptq import gptq_quantize, relative_error
from llmq.methods.rtn import rtn_quantize
from llmq.pipeline import quantize_model
from llmq.qtensor import QuantizedTensor
from llmq.recipe import build_config
from llmq.source import ModelSource

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
HEADS, KV = 4, 2  # llmq-ref-6m


def _gguf_tensors(path):
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(str(path))
    return {t.name: (t, dequantize(t.data, t.tensor_type)) for t in r.tensors}


def _gguf_name(hf: str) -> str:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 6).get_name(hf, try_suffixes=(".weight",))


def _quantize_gguf(monkeypatch, src, out, **recipe) -> dict:
    """`quantize --format gguf` of ``src``; returns every parameter as the run handed it to the GGUF sink
    (QuantizedTensors as they are, float tensors as float32): what the file is meant to hold."""
    seen = {}
    add = GGUFSink.add

    def recording(self, name, value):
        seen[name] = value if isinstance(value, QuantizedTensor) else value.float()
        add(self, name, value)

    monkeypatch.setattr(GGUFSink, "add", recording)
    quantize_model(ModelSource(str(src)), build_config({}, {"format": "gguf", **recipe}), out, progress=False)
    monkeypatch.undo()
    return seen


def _intended_model(src, seen: dict):
    """llmq's reading of the float model ``src`` with every parameter the run produced put in place:
    the model a GGUF file of that run should compute."""
    model, _ = load_model(str(src))
    params = dict(model.named_parameters())
    for name, value in seen.items():
        params[name].data = (value.dequantize() if isinstance(value, QuantizedTensor) else value).reshape(params[name].shape)
    return model


def _permuted(name: str, w: torch.Tensor) -> torch.Tensor:
    heads = HEADS if ".q_proj." in name else KV if ".k_proj." in name else None
    return w[rotary_row_order(w.shape[0], heads)] if heads else w


def _weights_with_outliers(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1, : cols // 2] = 0  # all-zero blocks and super-blocks
    w[2, 40:50] += 0.5  # an outlier group
    w[3] = w[3].abs()  # a row with no negative value (minimum > 0 for Q4_1/Q5_1)
    return w


@pytest.mark.parametrize("gtype", LEGACY + KQUANTS)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_type_dequantizes_to_llmq_values(gtype, method):
    """gguf's own dequantizer reads back exactly the values llmq chose (acceptance 1)."""
    from gguf.quants import dequantize

    spec = BLOCK_TYPES[gtype]
    w = _weights_with_outliers(8, 512, 0)
    rtn = rtn_quantize(w, spec)
    if method == "rtn":
        qt = rtn
        rel = float(((qt.dequantize() - w) ** 2).sum() / (w**2).sum())
        assert rel < {2: 0.15, 3: 0.05, 4: 0.02, 5: 0.005, 6: 0.002, 8: 1e-4}[spec.bits]
    else:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2048, 512, generator=g) @ torch.randn(512, 512, generator=g) * 0.1  # correlated inputs
        H = 2 * x.T @ x / len(x)
        qt, _ = gptq_quantize(w, H, spec)
        # on the same grid family, error feedback lowers the output error ||WX - QX||^2
        assert relative_error(w, qt.dequantize(), H) < relative_error(w, rtn.dequantize(), H)
    assert int(qt.codes.max()) <= spec.maxq
    values = dequantize(spec.pack(qt), spec.ggml_type)
    assert values.dtype == np.float32
    assert np.array_equal(values.reshape(qt.shape), qt.dequantize().numpy())


@pytest.mark.parametrize("gtype", KQUANTS)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_kquants_pack_super_blocks_of_tiny_weights(gtype, method):
    """Rows whose super-scale is an fp16 subnormal (weights down to ~1e-6, as in small-initialised
    layers) still pack, and gguf's dequantizer reads back exactly llmq's values."""
    from gguf.quants import dequantize

    spec = BLOCK_TYPES[gtype]
    w = _weights_with_outliers(16, 512, 0) * torch.logspace(0, -5, 16)[:, None]
    qt = rtn_quantize(w, spec) if method == "rtn" else gptq_quantize(w, torch.eye(512), spec)[0]
    values = dequantize(spec.pack(qt), spec.ggml_type)
    assert np.array_equal(values.reshape(qt.shape), qt.dequantize().numpy())


def test_kquant_error_shrinks_with_bits_and_beats_legacy_at_4_bits():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3)) * 0.02
    err = {t: float(((rtn_quantize(w, BLOCK_TYPES[t]).dequantize() - w) ** 2).mean()) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0")}
    assert err["Q2_K"] > err["Q3_K"] > err["Q4_K"] > err["Q5_K"] > err["Q6_K"]
    assert err["Q4_K"] < err["Q4_0"]  # the searched ranges and the minimum pay off


def test_packer_refuses_values_off_the_kquant_grid():
    qt = rtn_quantize(torch.randn(2, 256), BLOCK_TYPES["Q4_K"])
    qt.scales[0, 3] *= 1.001  # no longer fp16 super-scale x 6-bit integer
    with pytest.raises(LlmqError, match="not on the K-quant grid"):
        BLOCK_TYPES["Q4_K"].pack(qt)


@pytest.mark.parametrize("gtype", LEGACY + KQUANTS)
def test_unpack_inverts_pack(gtype):
    """Each type record reads its own blocks back into the same codes, scales, zeros and minimums."""
    t = BLOCK_TYPES[gtype]
    qt = rtn_quantize(_weights_with_outliers(4, 512, 5), t)
    back = t.unpack(t.pack(qt), qt.shape)
    assert back.grid == t and torch.equal(back.codes, qt.codes) and torch.equal(back.zeros, qt.zeros)
    assert torch.equal(back.scales, qt.scales) and torch.equal(back.dequantize(), qt.dequantize())
    assert (back.offsets is None) == (qt.offsets is None) and (qt.offsets is None or torch.equal(back.offsets, qt.offsets))


@pytest.mark.parametrize("gtype", ["Q4_K_M", pytest.param("Q5_K_M", marks=pytest.mark.slow), pytest.param("Q4_0", marks=pytest.mark.slow),
                                   pytest.param("Q5_1", marks=pytest.mark.slow), pytest.param("Q3_K", marks=pytest.mark.slow),
                                   pytest.param("Q2_K", marks=pytest.mark.slow), pytest.param("Q6_K", marks=pytest.mark.slow)])
def test_gptq_values_survive_gguf_dequantizer(tmp_path, monkeypatch, gtype):
    """The whole path: GPTQ's codes on each tensor's planned grid are what gguf's dequantizer reads."""
    need(REF6M)
    out = tmp_path / "m.gguf"
    seen = _quantize_gguf(monkeypatch, REF6M, out, method="gptq", gguf_type=gtype, dataset=str(need(C4)), nsamples=8, seqlen=128)
    read = _gguf_tensors(out)
    types = {}
    for name, qt in seen.items():
        if not (isinstance(qt, QuantizedTensor) and ".layers." in name):
            continue
        t, values = read[_gguf_name(name)]
        assert t.tensor_type.name == qt.grid.name
        assert np.array_equal(values.reshape(qt.shape), _permuted(name, qt.dequantize()).numpy())
        types[t.name] = t.tensor_type.name
    assert len(types) == 6 * 7
    base = gtype.removesuffix("_M")
    if gtype.endswith("_M"):  # llama.cpp's use_more_bits layers (of 6: 2 and 5) get Q6_K in attn_v and ffn_down
        assert {n for n, t in types.items() if t == "Q6_K"} == {f"blk.{i}.{m}.weight" for i in (2, 5) for m in ("attn_v", "ffn_down")}
        assert sum(t == base for t in types.values()) == 42 - 4
    else:
        assert set(types.values()) == {base}
    assert read["token_embd.weight"][0].tensor_type.name == base
    assert read["output.weight"][0].tensor_type.name == "Q6_K"
    assert read["output_norm.weight"][0].tensor_type.name == "F32"
    import gguf

    fields = gguf.GGUFReader(str(out)).fields
    assert fields["general.name"].contents() == "llmq-ref-6m"  # the model's name, not a staging directory's


def test_gguf_file_records_its_provenance(tmp_path):
    """The file carries where it came from (the source's files, hashed here independently) and how it was
    made, with nothing that changes between runs: a second run writes the same bytes."""
    import hashlib
    import json

    import gguf

    import llmq

    need(REF6M)
    cfg = build_config({}, {"method": "rtn", "format": "gguf", "gguf_type": "Q8_0"})
    for name in ("a.gguf", "b.gguf"):
        quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / name, progress=False)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    prov = json.loads(gguf.GGUFReader(str(tmp_path / "a.gguf")).fields["llmq.provenance"].contents())
    weights = {p.name for p in REF6M.glob("*.safetensors")}
    assert prov["source"]["model"] == str(REF6M) and prov["llmq_version"] == llmq.__version__
    assert prov["source"]["files_sha256"] == {n: hashlib.sha256((REF6M / n).read_bytes()).hexdigest()
                                              for n in ["config.json", *weights]}
    assert prov["recipe"]["method"] == "rtn" and prov["recipe"]["gguf"]["file_type"] == "Q8_0"
    assert "created" not in prov and "files_sha256" not in prov


@pytest.mark.parametrize("gtype", LEGACY)
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
        if ".layers." in name and name.endswith("proj.weight") or name == "model.embed_tokens.weight":
            expected = reference(_permuted(name, w).numpy(), gguf.GGMLQuantizationType[gtype])
            assert np.array_equal(np.asarray(r[_gguf_name(name)].data), expected), name
            checked += 1
    assert checked == 43


def test_plan_falls_back_for_widths_a_type_cannot_hold():
    plan = GGUFPlan("Q4_K_M", n_layers=8)
    assert plan.tensor_type("blk.0.attn_q.weight", (256, 512)) == ("Q4_K", None)
    assert plan.tensor_type("blk.0.attn_v.weight", (256, 512)) == ("Q6_K", None)  # layer 0 < 8/8... first eighth
    assert plan.tensor_type("blk.1.attn_v.weight", (256, 512)) == ("Q4_K", None)
    t, note = plan.tensor_type("blk.1.ffn_down.weight", (256, 352))
    assert t == "Q5_0" and "352 columns" in note and "Q4_K" in note
    t, note = plan.tensor_type("blk.1.ffn_down.weight", (256, 172))
    assert t == "F16" and note
    assert plan.tensor_type("output_norm.weight", (256,)) == ("F32", None)
    assert plan.tensor_type("output.weight", (1000, 512)) == ("Q6_K", None)
    assert GGUFPlan("Q4_0", 8, has_output=False).tensor_type("token_embd.weight", (1000, 512)) == ("Q6_K", None)
    assert GGUFPlan("F16", 8).tensor_type("blk.0.attn_q.weight", (256, 512)) == ("F16", None)


@pytest.mark.parametrize("gtype", ["Q4_0", "Q4_K_M"])
def test_gguf_loads_in_transformers_and_matches(tmp_path, monkeypatch, gtype):
    """transformers' GGUF loader (gguf's dequantizer; it undoes the q/k permutation itself)
    computes the model llmq intended."""
    from transformers import AutoModelForCausalLM

    need(REF6M)
    seen = _quantize_gguf(monkeypatch, REF6M, tmp_path / "m.gguf", method="rtn", gguf_type=gtype)
    ours = _intended_model(REF6M, seen)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item())


LLAMA_CPP_TYPES = [*LEGACY, *KQUANTS, "Q4_K_M", "F16", "BF16", "F32"]


def test_llama_cpp_loads_every_type_and_agrees(tmp_path):
    """With the optional llama-cpp-python extra (acceptance 2): llama.cpp itself loads each type,
    and its logits match the same file dequantized by gguf and run in torch (transformers)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    need(REF6M)
    prompts = [[1, *torch.randint(3, 4096, (47,), generator=torch.Generator().manual_seed(s)).tolist()] for s in range(3)]
    for gtype in LLAMA_CPP_TYPES:
        d = tmp_path / gtype
        d.mkdir()
        export_gguf(str(REF6M), d / "m.gguf", gtype)
        llm = llama_cpp.Llama(model_path=str(d / "m.gguf"), n_ctx=256, logits_all=True, verbose=False, seed=0)
        ref = AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf", dtype=torch.float32).eval()
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
            with torch.no_grad():
                want = ref(torch.tensor([ids])).logits[0]
            # llama.cpp multiplies quantized weights with 8-bit-quantized activations: close, not equal
            err = (got - want).abs().max().item() / want.abs().max().item()
            agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            assert err < 0.05 and agree > 0.9, (gtype, err, agree)
        del llm


def test_unsupported_architecture_writes_nothing(tmp_path):
    src = save_tiny("opt", tmp_path / "neox")  # llama.cpp has no OPT graph
    cfg = build_config({}, {"method": "rtn", "format": "gguf", "gguf_type": "Q4_0"})
    with pytest.raises(LlmqError, match="GGUF export supports"):
        quantize_model(ModelSource(str(src)), cfg, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neox"]


def test_gguf_needs_a_type():
    with pytest.raises(LlmqError, match="--gguf-type"):
        build_config({}, {"format": "gguf"})


def _tiny_with_ref_tokenizer(family: str, path):
    """A random model of ``family`` with 256-wide rows (K-quants fit) and llmq-ref-6m's 4096-token BPE tokenizer."""
    import shutil

    from transformers import AutoModelForCausalLM

    need(REF6M)
    config = tiny_config(family, layers=2, hidden=256, inter=512, vocab=4096)
    # transformers' GGUF reader ignores attention.key_length: Qwen3 gets its config default (128),
    # other families hidden/heads.  llama.cpp reads the key; the test picks dims both agree on.
    config.head_dim = 128 if family == "qwen3" else 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REF6M / f, path / f)
    return path


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "phi3"])
def test_other_families_round_trip_through_transformers(tmp_path, family):
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms, head_dim != hidden/heads) and Mistral: an F32 GGUF reads
    back through transformers' GGUF loader as exactly the source model; a Q4_K file as llmq's RTN model."""
    from transformers import AutoModelForCausalLM

    src = _tiny_with_ref_tokenizer(family, tmp_path / "src")
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(3, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    for gtype in ("F32", "Q4_K"):
        d = tmp_path / gtype
        d.mkdir()
        export_gguf(str(src), d / "m.gguf", gtype)
        theirs = AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf", dtype=torch.float32).eval()
        ours = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        if gtype == "Q4_K":
            for name, mod in ours.named_modules():
                if isinstance(mod, torch.nn.Linear):  # llama-quantize's choice: Q4_K, the head at Q6_K
                    grid = "Q6_K" if name == "lm_head" else "Q4_K"
                    mod.weight.data = rtn_quantize(mod.weight.data, BLOCK_TYPES[grid]).dequantize()
            emb = ours.get_input_embeddings()
            emb.weight.data = rtn_quantize(emb.weight.data, BLOCK_TYPES["Q4_K"]).dequantize()
        with torch.no_grad():
            a, b = ours(ids).logits, theirs(ids).logits
        assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item()), (family, gtype)
    with torch.no_grad():
        assert not torch.allclose(fp(ids).logits, a, atol=1e-4 * a.abs().max().item())  # Q4_K did change the model


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3"])
def test_llama_cpp_runs_other_families(tmp_path, family):
    """With llama-cpp-python: Qwen2/Qwen3 files (no q/k permutation, biases, q/k norms) run in llama.cpp
    as they do through gguf's dequantizer in torch."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    src = _tiny_with_ref_tokenizer(family, tmp_path / "src")
    export_gguf(str(src), tmp_path / "m.gguf", "Q8_0")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, logits_all=True, verbose=False)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(3, 4096, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()


@pytest.mark.parametrize("gtype,ftype", [("Q4_0", 2), ("Q8_0", 7), ("Q4_K_M", 15), ("Q5_K_M", 17)])
def test_llama_quantize_agrees_on_types_and_bytes(tmp_path, gtype, ftype):
    """With llama-cpp-python: llama.cpp's own quantizer (llama-quantize's library call) on llmq's F32
    file picks the same type for every tensor as llmq's plan; for the legacy types the bytes match too,
    and for the K-quants llmq's rounding-to-nearest fit is within 5% of llama.cpp's weight error."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    import gguf
    from gguf.quants import dequantize

    need(REF6M)
    export_gguf(str(REF6M), tmp_path / "f32.gguf", "F32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(tmp_path / "theirs.gguf").encode(),
                                          ctypes.byref(params)) == 0
    export_gguf(str(REF6M), tmp_path / "ours.gguf", gtype)
    read = lambda p: {t.name: t for t in gguf.GGUFReader(str(p)).tensors}  # noqa: E731
    ours, theirs, f32 = read(tmp_path / "ours.gguf"), read(tmp_path / "theirs.gguf"), read(tmp_path / "f32.gguf")
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    sse = {"ours": 0.0, "theirs": 0.0}
    for n, t in ours.items():
        if t.tensor_type.name in LEGACY:
            assert np.array_equal(np.asarray(t.data), np.asarray(theirs[n].data)), n
        w = dequantize(f32[n].data, f32[n].tensor_type)
        sse["ours"] += float(((dequantize(t.data, t.tensor_type) - w) ** 2).sum())
        sse["theirs"] += float(((dequantize(theirs[n].data, theirs[n].tensor_type) - w) ** 2).sum())
    assert sse["ours"] < 1.01 * sse["theirs"], sse


@pytest.mark.parametrize("gtype", KQUANTS)
def test_kquant_rounding_matches_llama_cpp_quality(gtype):
    """With llama-cpp-python: ggml's own K-quant quantizer (ggml_quantize_chunk, no importance matrix)
    on llmq-ref-6m's weights; llmq's RTN fit has at most 5% more squared error (Q4_K..Q6_K: within 1%)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    from pathlib import Path

    import gguf
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    need(REF6M)
    lib = ctypes.CDLL(str(next(Path(llama_cpp.__file__).parent.glob("lib/libggml-base.so*"))))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]
    qtype = gguf.GGMLQuantizationType[gtype]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    ours = theirs = 0.0
    for name, w in load_file(REF6M / "model.safetensors").items():
        if w.ndim != 2:
            continue
        x = np.ascontiguousarray(w.float().numpy())
        dst = np.zeros(x.size // block * size, dtype=np.uint8)
        lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, dst.ctypes.data, 0, x.shape[0], x.shape[1], None)
        theirs += float(((dequantize(dst.reshape(x.shape[0], -1), qtype) - x) ** 2).sum())
        ours += float(((rtn_quantize(w.float(), BLOCK_TYPES[gtype]).dequantize().numpy() - x) ** 2).sum())
    assert ours < (1.05 if gtype in ("Q2_K", "Q3_K") else 1.01) * theirs, (ours, theirs)


def test_token_embedding_and_output_types_can_be_chosen(tmp_path):
    """As llama-quantize's --token-embedding-type / --output-tensor-type; a mix is not a tensor type."""
    import gguf

    need(REF6M)
    export_gguf(str(REF6M), tmp_path / "m.gguf", "Q4_K", token_embedding_type="q8_0", output_type="F16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["output.weight"] == "F16" and types["blk.0.attn_q.weight"] == "Q4_K"
    with pytest.raises(LlmqError, match="--gguf-output-type"):
        export_gguf(str(REF6M), tmp_path / "x.gguf", "Q4_K", output_type="Q4_K_M")
    assert not (tmp_path / "x.gguf").exists()


def _llama_cpp_error(llama_cpp, src, gguf_file) -> float:
    """Largest |llama.cpp logit - HF fp32 logit of ``src``| over 40 random tokens, relative to the
    largest HF logit."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(3, 4096, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    return (got - want).abs().max().item() / want.abs().max().item()


def _eval_loader_logits(src, gguf_file) -> tuple[torch.Tensor, torch.Tensor]:
    """(HF fp32 logits of ``src``, logits of ``gguf_file`` read by `llmq eval`'s loader) on 2 x 40 random tokens."""
    from transformers import AutoModelForCausalLM


    theirs, _, _ = load_for_eval(str(gguf_file))
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(3, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return fp(ids).logits, theirs(ids).logits


@pytest.mark.parametrize("family", ["gpt_neox", "phi", "gpt2"])
def test_llama_cpp_runs_layernorm_families(tmp_path, family):
    """With llama-cpp-python: GPT-NeoX (fused per-head q/k/v reordered for llama.cpp, parallel residual),
    Phi-2 (LayerNorm with biases, partial rotary, biased head) and GPT-2 (Conv1D weights, learned
    positions, tied head) compute the HF model's logits in llama.cpp, which transformers' GGUF loader
    cannot check for the first two."""
    llama_cpp = pytest.importorskip("llama_cpp")
    src = _tiny_with_ref_tokenizer(family, tmp_path / "src")
    for gtype, tol in (("F32", 1e-3), ("Q8_0", 0.03)):  # Q8_0: the packed fused rows are reordered too
        export_gguf(str(src), tmp_path / f"{gtype}.gguf", gtype)
        assert _llama_cpp_error(llama_cpp, src, tmp_path / f"{gtype}.gguf") < tol, gtype


@pytest.mark.parametrize("gtype,dtype", [("BF16", torch.bfloat16), ("F16", torch.float16)])
def test_float_types_hold_the_rounded_weights(tmp_path, gtype, dtype):
    """BF16/F16 files: gguf's reader returns exactly torch's rounding of each matrix; norms stay F32."""
    from safetensors.torch import load_file

    need(REF6M)
    export_gguf(str(REF6M), tmp_path / "m.gguf", gtype)
    read = _gguf_tensors(tmp_path / "m.gguf")
    for name, w in load_file(REF6M / "model.safetensors").items():
        t, values = read[_gguf_name(name)]
        if w.ndim == 1:
            assert t.tensor_type.name == "F32" and np.array_equal(values, w.numpy())
        else:
            assert t.tensor_type.name == gtype
            assert np.array_equal(values.reshape(w.shape), _permuted(name, w).to(dtype).float().numpy()), name


def _tiny_gemma(family: str, path, *, hidden: int = 256, layers: int = 2, **config):
    """A random Gemma-family model (tied head, rows that are multiples of 256) with llmq-ref-6m's tokenizer.
    Its norm weights are drawn around 0, not left at 0, so a file that forgot Gemma's (1 + w) computes
    another model; ``config`` overrides config fields."""
    import shutil

    from transformers import AutoModelForCausalLM

    need(REF6M)
    cfg = tiny_config(family, layers=layers, hidden=hidden, inter=512, vocab=4096)
    cfg.tie_word_embeddings = True
    cfg.head_dim = hidden // 4
    if family != "gemma":
        cfg.query_pre_attn_scalar = cfg.head_dim
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REF6M / f, path / f)
    return path


@pytest.mark.parametrize("family", [pytest.param("gemma2", marks=pytest.mark.slow), "gemma3_text"])
def test_gemma_round_trips_through_transformers(tmp_path, monkeypatch, family):
    """Gemma 2/3 (norms stored as 1 + w, tied head): an F32 file reads back through transformers' GGUF
    loader as exactly the source model, and an AWQ Q4_0 file (AWQ rescales the norms too) as llmq's
    dequantized AWQ checkpoint.  transformers' reader assumes head_dim 256, hence hidden 1024."""
    from transformers import AutoModelForCausalLM

    src = _tiny_gemma(family, tmp_path / "src", hidden=1024)
    ids = torch.randint(3, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    export_gguf(str(src), tmp_path / "f32.gguf", "F32")
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f32.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = fp(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item())

    seen = _quantize_gguf(monkeypatch, src, tmp_path / "q4.gguf", method="awq", gguf_type="Q4_0", dataset=str(need(C4)),
                          nsamples=4, seqlen=64)
    assert seen["model.embed_tokens.weight"].grid.name == "Q6_K"  # tied: the head's type
    ours = _intended_model(src, seen)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q4.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        b, q = theirs(ids).logits, ours(ids).logits
    assert torch.allclose(q, b, atol=1e-4 * q.abs().max().item())
    assert not torch.allclose(a, q, atol=1e-2 * a.abs().max().item())  # the AWQ file is another model


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
def test_llama_cpp_runs_gemma_families(tmp_path, family):
    """With llama-cpp-python: Gemma files compute the HF model's logits in llama.cpp, sliding-window
    layers included (window 16 < 40 tokens); Gemma 3 with 6 layers, so one attends globally with its
    own linearly scaled rotary base."""
    llama_cpp = pytest.importorskip("llama_cpp")
    extra = {"gemma": {}, "gemma2": {"sliding_window": 16}, "gemma3_text": GEMMA3_SCALED}[family]
    src = _tiny_gemma(family, tmp_path / "src", layers=6 if family == "gemma3_text" else 2, **extra)
    export_gguf(str(src), tmp_path / "m.gguf", "F32")
    assert _llama_cpp_error(llama_cpp, src, tmp_path / "m.gguf") < 3e-3


@pytest.mark.parametrize("family,config,match", [
    ("gemma2", {"query_pre_attn_scalar": 48}, "query_pre_attn_scalar"),
    ("gemma", {"tie_word_embeddings": False}, "not tied"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}}}, "base 10000"),
    ("gemma3_text", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
])
def test_gemma_llama_cpp_cannot_compute_is_refused(tmp_path, family, config, match):
    """Config variants llama.cpp's Gemma graphs hard-code differently are refused before any work."""
    src = _tiny_gemma(family, tmp_path / "src", **config)
    cfg = build_config({}, {"method": "rtn", "format": "gguf", "gguf_type": "Q4_0"})
    with pytest.raises(LlmqError, match=match):
        quantize_model(ModelSource(str(src)), cfg, tmp_path / "x.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


GEMMA3_SCALED = {"sliding_window": 16, "rope_parameters": {
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_eval_loader_reads_what_transformers_gguf_config_skips(tmp_path, family):
    """`llmq eval --model x.gguf` completes transformers' GGUF config with what llama.cpp reads: a head_dim
    other than the config class's default (64 here; Qwen3's is 128, Gemma's 256), Gemma 3's attention
    scale (query_pre_attn_scalar 64, default 256) and linear rotary scaling (6 layers, one global).
    An F32 file then computes the source model."""
    if family == "gemma3_text":
        src = _tiny_gemma(family, tmp_path / "src", layers=6, **GEMMA3_SCALED)
    else:
        src = _tiny_reconfigured(family, tmp_path / "src", head_dim=64)
    export_gguf(str(src), tmp_path / "m.gguf", "F32")
    a, b = _eval_loader_logits(src, tmp_path / "m.gguf")
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item())


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_gptq_gguf_keeps_biases_and_computes_llmqs_model(tmp_path, monkeypatch, family):
    """`quantize --format gguf` on families with biased linears (Qwen2's q/k/v, GPT-2's every linear,
    its Conv1D weights stored transposed): the file, read back by `llmq eval`'s loader (transformers'
    GGUF reader), computes llmq's dequantized GPTQ checkpoint, with the token embedding, head and GPT-2's
    learned positions as the plan stores them."""
    from transformers import AutoModelForCausalLM


    src = _tiny_with_ref_tokenizer(family, tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():  # HF initialises biases to 0: a file that dropped them would not show it
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(src)
    seen = _quantize_gguf(monkeypatch, src, tmp_path / "m.gguf", method="gptq", gguf_type="Q4_0", dataset=str(need(C4)),
                          nsamples=4, seqlen=64)
    assert sum(isinstance(v, QuantizedTensor) for v in seen.values()) >= 2 * 4  # the decoder linears at least
    ours = _intended_model(src, seen)
    if family == "gpt2":  # learned positions: F16, as llama-quantize leaves them
        wpe = ours.transformer.wpe.weight
        wpe.data = wpe.data.half().float()
    theirs, _, _ = load_for_eval(str(tmp_path / "m.gguf"))
    ids = torch.randint(3, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item())


LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # short, so 40 tokens feel it


def test_llama3_rope_factors_match_transformers():
    """rope_freqs.weight divides each default frequency into what transformers' own llama3 rotary init gives."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmq.gguf.model import llama3_rope_factors

    config = tiny_config("llama", hidden=256)
    config.rope_parameters = {**LLAMA31_ROPE, "original_max_position_embeddings": 8192}
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ours = llama3_rope_factors(config.rope_parameters, 64, 500000.0)
    assert ours.min() == 1.0 and ours.max() == 8.0  # both ends of the band are present
    assert torch.allclose(base / ours.double(), theirs.double(), rtol=1e-6)


def _tiny_reconfigured(family: str, path, **config):
    """_tiny_with_ref_tokenizer's model with ``config`` fields changed (weights drawn again)."""
    from transformers import AutoModelForCausalLM

    src = _tiny_with_ref_tokenizer(family, path)
    cfg = AutoModelForCausalLM.from_pretrained(src).config
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    return src


@pytest.mark.parametrize("rope", [LLAMA31_ROPE, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}],
                         ids=["llama3", "linear"])
def test_rope_scaled_llama_reads_back_in_eval_loader(tmp_path, rope):
    """Llama 3.1-style (rope_freqs tensor) and linear rotary scaling reach `llmq eval`'s GGUF loader,
    which transformers' GGUF reader alone would drop: an F32 file computes the source model."""
    src = _tiny_reconfigured("llama", tmp_path / "src", rope_parameters=rope)
    export_gguf(str(src), tmp_path / "m.gguf", "F32")
    a, b = _eval_loader_logits(src, tmp_path / "m.gguf")
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item())


@pytest.mark.parametrize("family,rope", [("llama", LLAMA31_ROPE), ("qwen2", {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0})])
def test_llama_cpp_applies_rope_scaling(tmp_path, family, rope):
    """With llama-cpp-python: Llama 3.1-style rotary scaling (rope_freqs.weight) and linear scaling
    compute the HF model's logits in llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    src = _tiny_reconfigured(family, tmp_path / "src", rope_parameters=rope)
    export_gguf(str(src), tmp_path / "m.gguf", "F32")
    assert _llama_cpp_error(llama_cpp, src, tmp_path / "m.gguf") < 2e-3


def test_rope_scaling_llama_cpp_lacks_is_refused(tmp_path):
    src = _tiny_reconfigured("qwen2", tmp_path / "src", rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(LlmqError, match="rotary scaling"):
        export_gguf(str(src), tmp_path / "m.gguf", "F32")
    assert not (tmp_path / "m.gguf").exists()


# ---- mixture-of-experts ----------------------------------------------------------------------

MOE = {  # family -> config: 4 experts, 2 per token, rows that are multiples of 256
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, head_dim=64, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=512,
                      decoder_sparse_step=1, norm_topk_prob=False),
}


def _tiny_moe(family: str, path, **config):
    """A random MoE model of ``family`` (MOE's config, then ``config``) with llmq-ref-6m's tokenizer.
    Routers are drawn wider than HF's init, so which experts a token reaches, and with what weight, matter."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    need(REF6M)
    common = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    cfg = AutoConfig.for_model(family, **{**common, **MOE[family], **config})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):  # (dense layers have none)
                layer.mlp.gate.weight.normal_(0, 0.2)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REF6M / f, path / f)
    return path


@pytest.mark.parametrize("family", MOE)
def test_moe_gguf_stacks_experts_and_reads_back(tmp_path, family):
    """Experts are written as llama.cpp's stacked ffn_{gate,up,down}_exps (expert-major), routers stay F32
    in a quantized file, and an F32 file read back by `llmq eval`'s loader computes the source model
    (transformers' own GGUF reader for the Qwen MoE families; Mixtral's experts, which that reader drops,
    through llmq's reading of the stacked tensors)."""
    from safetensors.torch import load_file

    src = _tiny_moe(family, tmp_path / "src")
    export_gguf(str(src), tmp_path / "f32.gguf", "F32")
    a, b = _eval_loader_logits(src, tmp_path / "f32.gguf")
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item())

    assert export_gguf(str(src), tmp_path / "q.gguf", "Q4_K_M") == []
    read = _gguf_tensors(tmp_path / "q.gguf")
    weights = load_file(src / "model.safetensors")
    up = "w3" if family == "mixtral" else "up_proj"
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    t, values = read["blk.1.ffn_up_exps.weight"]
    assert t.tensor_type.name == "Q4_K" and values.shape == (4, 512 if family == "mixtral" else 256, 256)
    for e in range(4):  # expert e's slice is expert e's own rounding
        want = rtn_quantize(weights[f"model.layers.1.{moe}.experts.{e}.{up}.weight"], BLOCK_TYPES["Q4_K"]).dequantize()
        assert np.array_equal(values[e], want.numpy()), e
    assert read["blk.1.ffn_down_exps.weight"][0].tensor_type.name == "Q6_K"  # Q4_K_M's layer bump reaches experts
    assert read["blk.0.ffn_gate_inp.weight"][0].tensor_type.name == "F32"


def test_moe_gguf_bits_per_weight_count_the_experts(tmp_path):
    """bits per linear weight of a MoE file counts the stacked experts: every decoder linear of a Q4_K
    file is Q4_K, 4.5 bits per weight (144 bytes per 256 values)."""
    from llmq.arch import decoder_linears
    from llmq.gguf.reader import measure
    from llmq.projection import meta_model

    src = _tiny_moe("qwen3_moe", tmp_path / "src")
    export_gguf(str(src), tmp_path / "q.gguf", "Q4_K")
    model = meta_model(src / "config.json")
    weights = sum(lin.weight.numel() for lin in decoder_linears(model).values())
    assert measure(tmp_path / "q.gguf", 1, weights)["bits_per_linear_weight"] == 4.5


@pytest.mark.parametrize("family", MOE)
def test_gptq_moe_gguf_computes_llmqs_model(tmp_path, monkeypatch, family):
    """`quantize --format gguf` on a MoE model: GPTQ calibrates each expert on its routed tokens, and the
    file, read back by `llmq eval`'s loader, computes the model the run produced."""

    src = _tiny_moe(family, tmp_path / "src")
    seen = _quantize_gguf(monkeypatch, src, tmp_path / "m.gguf", method="gptq", gguf_type="Q4_K", dataset=str(need(C4)),
                          nsamples=4, seqlen=64)
    ours = _intended_model(src, seen)

    theirs, _, _ = load_for_eval(str(tmp_path / "m.gguf"))
    ids = torch.randint(3, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item())


@pytest.mark.parametrize("family", MOE)
def test_llama_cpp_runs_moe_families(tmp_path, family):
    """With llama-cpp-python: Mixtral (llama graph with experts), Qwen3-MoE and Qwen2-MoE (shared expert
    behind a sigmoid gate) files compute the HF model's logits in llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")

    src = _tiny_moe(family, tmp_path / "src")
    export_gguf(str(src), tmp_path / "f32.gguf", "F32")
    assert _llama_cpp_error(llama_cpp, src, tmp_path / "f32.gguf") < 1e-3
    # Q8_0 (stacked blocks): against the file as gguf's dequantizer reads it.  llama.cpp also rounds the
    # activations to 8 bits, which can flip a near-tied routing choice at a token or two: the median
    # position is compared, which a misplaced expert or block would move by orders of magnitude.
    export_gguf(str(src), tmp_path / "q8.gguf", "Q8_0")
    ref, _, _ = load_for_eval(str(tmp_path / "q8.gguf"))
    ids = torch.randint(3, 4096, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "q8.gguf"), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    assert ((got - want).abs().amax(-1) / want.abs().max()).median().item() < 0.02


@pytest.mark.parametrize("family,config,match", [
    ("qwen3_moe", dict(norm_topk_prob=False), "renormalises"),
    ("qwen2_moe", dict(norm_topk_prob=True), "does not renormalise"),
    ("qwen2_moe", dict(decoder_sparse_step=2), "experts in every layer"),
    ("qwen3_moe", dict(mlp_only_layers=[0]), "experts in every layer"),
    ("qwen2_moe", dict(tie_word_embeddings=True), "output head of its own"),
])
def test_moe_llama_cpp_cannot_compute_is_refused(tmp_path, family, config, match):
    src = _tiny_moe(family, tmp_path / "src", **config)
    with pytest.raises(LlmqError, match=match):
        export_gguf(str(src), tmp_path / "m.gguf", "Q4_K")
    assert not (tmp_path / "m.gguf").exists()
