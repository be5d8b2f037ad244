"""Every export computes the same function as llmq's quantized model, checked by loaders llmq did not write."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REF6M, ROOT, need
from llmq.checkpoint import load_model
from llmq.recipe import build_config
from llmq.errors import LlmqError
from llmq.export import export_checkpoint
from llmq.formats import FORMATS
from llmq.grid import IntGrid
from llmq.methods.rtn import rtn_quantize
from llmq.pipeline import quantize_model
from llmq.provenance import PROVENANCE_FILE, verify
from llmq.source import ModelSource


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """llmq-ref-6m (all dims multiples of 256), RTN W4 g128 asym, as a gptq_v2 checkpoint."""
    need(REF6M)
    out = tmp_path_factory.mktemp("exp") / "src"
    cfg = build_config({}, {"method": "rtn", "bits": 4, "group_size": 128, "sym": False, "dtype": "float32"})
    quantize_model(ModelSource(str(REF6M)), cfg, out, progress=False)
    model, _ = load_model(str(out))
    return out, model


def _all_tensors(d):
    t = {}
    for f in d.glob("*.safetensors"):
        t.update(load_file(f))
    return t


@pytest.mark.parametrize("fmt", ["gptq_v2", "awq", "compressed-tensors", "fp16"])
def test_export_reload_is_bitwise(quantized, tmp_path, fmt):
    src, model = quantized
    out = export_checkpoint(str(src), fmt, tmp_path / fmt)
    again, _ = load_model(str(out))
    ref = model.state_dict()
    for name, w in again.state_dict().items():
        if name.endswith("proj.weight"):
            expected = ref[name].half().float() if fmt == "fp16" else ref[name]
            assert torch.equal(w, expected), name
    assert verify(out) == []


def test_gptq_v1_refuses_asym_zero_points(quantized, tmp_path):
    src, _ = quantized
    with pytest.raises(LlmqError, match="gptq_v2"):
        export_checkpoint(str(src), "gptq", tmp_path / "v1")
    assert not (tmp_path / "v1").exists() and list(tmp_path.iterdir()) == []


def test_independent_unpackers(quantized, tmp_path):
    """GPTQ v2 and AWQ GEMM decoded from the published layouts by code written here, not llmq's."""
    src, model = quantized
    ref = model.model.layers[1].mlp.down_proj.weight  # out 256, in 768
    out_f, in_f = ref.shape
    t = _all_tensors(export_checkpoint(str(src), "awq", tmp_path / "awq"))
    p = "model.layers.1.mlp.down_proj."
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    qw, qz, sc = t[p + "qweight"].to(torch.int64) & 0xFFFFFFFF, t[p + "qzeros"].to(torch.int64) & 0xFFFFFFFF, t[p + "scales"]
    W = torch.empty(in_f, out_f)
    for col in range(out_f):
        word, slot = divmod(col, 8)
        nib = order.index(slot)  # nibble i holds column order[i] of its block of 8
        q = (qw[:, word] >> (4 * nib)) & 0xF
        z = (qz[:, word] >> (4 * nib)) & 0xF
        g = torch.arange(in_f) // 128
        W[:, col] = (q - z[g]).float() * sc[g, col].float()
    assert torch.equal(W.T, ref)

    t = _all_tensors(src)  # the gptq_v2 source checkpoint
    qw, qz, sc, gi = (t[p + k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    W = torch.empty(out_f, in_f)
    for i in range(in_f):
        q = (qw[i // 8].to(torch.int64) >> (4 * (i % 8))) & 0xF
        g = int(gi[i])
        z = (qz[g].to(torch.int64).repeat_interleave(8) >> (4 * torch.arange(out_f).remainder(8))) & 0xF  # v2: stored as is
        W[:, i] = (q - z).float() * sc[g].float()
    assert torch.equal(W, ref)


def test_compressed_tensors_loads_in_transformers(tmp_path):
    """Symmetric pack-quantized: transformers + compressed-tensors compute bitwise the same logits."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    need(REF6M)
    cfg = build_config({}, {"method": "rtn", "bits": 4, "group_size": 128, "format": "compressed-tensors", "dtype": "float32"})
    quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "ct", progress=False)
    ours, _ = load_model(str(tmp_path / "ct"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("bits,sym,gs", [(4, False, 128), (3, False, 32), (8, True, -1), (2, False, 64)])
def test_compressed_tensors_matches_their_compressor(bits, sym, gs):
    """Our packed tensors equal what compressed-tensors' own compressor makes of the same quantized weight.
    (Asymmetric files are checked this way: transformers 5.24 with compressed-tensors 0.20 expects unpacked
    zero points when it builds the empty model, so it cannot load asymmetric pack-quantized files, theirs included.)"""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    spec = IntGrid(bits, gs, sym)
    qt = rtn_quantize(torch.randn(96, 256, generator=torch.Generator().manual_seed(bits)), spec)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel" if gs == -1 else "group",
                            group_size=None if gs == -1 else gs)
    offset = 2 ** (bits - 1)
    state = {"weight": qt.dequantize(), "weight_scale": qt.scales, "weight_zero_point": (qt.zeros.to(torch.int8) - offset).to(torch.int8)}
    if sym:
        state["weight_zero_point"] = torch.zeros_like(state["weight_zero_point"])
    theirs = PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args))
    ours = FORMATS["compressed-tensors"].pack(qt)
    assert torch.equal(ours["weight_packed"], theirs["weight_packed"])
    assert torch.equal(ours["weight_shape"], theirs["weight_shape"])
    if not sym:
        assert torch.equal(ours["weight_zero_point"], theirs["weight_zero_point"])
    else:
        assert "weight_zero_point" not in ours and "weight_zero_point" not in theirs


def _accepts(fmt: str, bits: int, gs: int, sym: bool) -> bool:
    """What each layout can store, from its published description (not from llmq's check)."""
    return {"gptq": sym,  # v1 stores zero - 1: a zero point of 0 underflows
            "gptq_v2": True,
            "awq": bits == 4 and gs != -1,  # GEMM: 4-bit codes in groups
            "compressed-tensors": True,
            "bitsandbytes": False}[fmt]  # (its own NF4/FP4/LLM.int8 grids only: tests/test_bnb.py)


def _pack_or_refuse(fmt: str, qt, bits: int, gs: int, sym: bool):
    f = FORMATS[fmt]
    if not _accepts(fmt, bits, gs, sym):
        with pytest.raises(LlmqError, match=f"^format {fmt!r} cannot represent this"):
            f.check(qt.grid)
            f.pack(qt)
        return None
    f.check(qt.grid)
    return f.pack(qt)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [-1, 32, 128])
def test_format_matrix_roundtrips_or_refuses(fmt, bits, sym, gs):
    """Every combination a layout can store round-trips exactly; every other one is refused clearly."""
    grid = IntGrid(bits, gs, sym)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    w[:, :128] = w[:, :128].abs()  # all-positive groups: asymmetric zero points of 0 occur
    qt = rtn_quantize(w, grid)
    packed = _pack_or_refuse(fmt, qt, bits, gs, sym)
    if packed is None:
        return
    back = FORMATS[fmt].unpack(packed, grid, (64, 256))
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert torch.equal(back.codes, qt.codes)


def test_every_integer_format_takes_some_of_the_matrix():
    assert all(any(_accepts(f, b, g, s) for b in (2, 3, 4, 8) for g in (-1, 32, 128) for s in (True, False))
               for f in FORMATS if f != "bitsandbytes")


@pytest.mark.slow  # (tens of seconds; runs with -m slow)
def test_verify_detects_a_flipped_byte(tmp_path):
    need(REF6M)
    out = tmp_path / "q"
    cfg = build_config({}, {"method": "rtn", "bits": 4, "group_size": 128, "max_shard_size": "2MB"})
    quantize_model(ModelSource(str(REF6M)), cfg, out, progress=False)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        p = subprocess.run([sys.executable, "-m", "llmq", "verify", str(out)], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 1 and f"modified: {shard.name}" in p.stdout
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    assert subprocess.run([sys.executable, "-m", "llmq", "verify", str(out)], cwd=ROOT, capture_output=True).returncode == 0


def test_quantize_direct_to_format(tmp_path):
    need(REF6M)
    cfg = build_config({}, {"method": "rtn", "bits": 4, "group_size": 128, "format": "awq"})
    quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "a", progress=False)
    q = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "awq" and q["version"] == "gemm" and q["modules_to_not_convert"] == ["lm_head"]
    with pytest.raises(LlmqError, match="4-bit"):
        quantize_model(ModelSource(str(REF6M)), build_config({}, {"method": "rtn", "bits": 3, "format": "awq"}), tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", [(256, 512), (96, 256), (128, 384)])
@pytest.mark.parametrize("bits,gs,sym", [(4, 128, True), (3, 32, False), (8, -1, True), (2, 64, False)])
def test_nbytes_matches_pack(fmt, shape, bits, gs, sym):
    """The size projection's byte count is what packing writes, for every combination a layout stores."""
    grid = IntGrid(bits, gs, sym)
    qt = rtn_quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(0)) + (0 if sym else 0.5), grid)
    packed = _pack_or_refuse(fmt, qt, bits, gs, sym)
    if packed is not None:
        assert FORMATS[fmt].nbytes(*shape, grid) == sum(t.numel() * t.element_size() for t in packed.values())


def test_act_order_checkpoint_is_a_plain_grouped_one(tmp_path):
    """Act-order with static groups stores codes in input order with g_idx = i // group_size, so the
    config must not send runtimes down their reordering path (desc_act); the setting is kept in meta."""
    from conftest import STORIES, TINYSTORIES

    need(STORIES)
    need(TINYSTORIES)
    cfg = build_config({}, {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "dataset": str(TINYSTORIES),
                            "nsamples": 4, "seqlen": 128, "dtype": "float32"})
    out = quantize_model(ModelSource(str(STORIES)), cfg, tmp_path / "act", progress=False).output
    for d in (out, export_checkpoint(str(out), "gptq_v2", tmp_path / "again")):
        q = json.loads((d / "config.json").read_text())["quantization_config"]
        assert q["desc_act"] is False and q["static_groups"] is True and q["meta"]["act_order"] is True
        for name, t in _all_tensors(d).items():
            if name.endswith(".g_idx"):
                assert torch.equal(t.long(), torch.arange(t.numel()) // 32), name


def test_permuted_g_idx_keeps_desc_act(quantized, tmp_path):
    """A checkpoint whose g_idx really is permuted (true act-order, e.g. from AutoGPTQ) is re-exported
    with desc_act, and its weights survive the export."""
    import shutil

    from safetensors.torch import save_file

    src, _ = quantized
    d = tmp_path / "perm"
    shutil.copytree(src, d)
    name = "model.layers.0.mlp.down_proj.g_idx"
    for f in d.glob("*.safetensors"):
        t = load_file(f)
        if name in t:
            perm = torch.randperm(t[name].numel(), generator=torch.Generator().manual_seed(0))
            t[name] = t[name][perm].contiguous()
            save_file(t, f, metadata={"format": "pt"})
    (d / PROVENANCE_FILE).unlink()  # its hashes no longer hold
    model, _ = load_model(str(d))
    out = export_checkpoint(str(d), "gptq_v2", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    again, _ = load_model(str(out))
    for k, w in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], w), k


@pytest.mark.parametrize("bits,full_range", [(4, False), (3, True)])
def test_gptqmodel_decodes_act_order_checkpoint(tmp_path, bits, full_range):
    """GPTQModel (when installed; not a CI dependency) reads an act-order checkpoint to llmq's weights, a
    full-range grid's negative scales too."""
    pytest.importorskip("gptqmodel")
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its default thread pools fail on small CPUs
    from gptqmodel import BACKEND, GPTQModel

    from conftest import C4

    need(REF6M)
    cfg = build_config({}, {"method": "gptq", "bits": bits, "group_size": 128, "act_order": True, "dataset": str(need(C4)),
                            "nsamples": 4, "seqlen": 128, "dtype": "float16", "full_range": full_range})
    out = quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "q", progress=False).output
    ours, _ = load_model(str(out))
    theirs = GPTQModel.load(str(out), device="cpu", dtype=torch.float16, backend=BACKEND.TORCH).model
    for name, mod in ours.named_modules():
        if name.endswith("proj"):
            eye = torch.eye(mod.in_features, dtype=torch.float16)
            with torch.no_grad():
                w = theirs.get_submodule(name)(eye).float().T  # the weight its kernel applies
            assert torch.equal(w, mod.weight.half().float()), name
