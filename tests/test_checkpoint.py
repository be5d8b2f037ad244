"""Quantize a real model, check the on-disk GPTQ layout with safetensors' own reader, and load it back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmq.checkpoint import load_model
from llmq.recipe import build_config
from llmq.grid import IntGrid
from llmq.methods.rtn import rtn_quantize
from llmq.pipeline import quantize_model
from llmq.provenance import PROVENANCE_FILE, sha256_file
from llmq.source import ModelSource


@pytest.fixture(scope="module")
def rtn_ckpt(tmp_path_factory):
    from conftest import STORIES, need

    need(STORIES)
    out = tmp_path_factory.mktemp("ck") / "q"
    # (min/max grids, as the independent RTN below computes; the range search has its own tests in test_grid)
    cfg = build_config({}, {"method": "rtn", "bits": 4, "group_size": 32, "dtype": "float32", "max_shard_size": "100KB",
                            "grid_search": False})
    quantize_model(ModelSource(str(STORIES)), cfg, out, progress=False)
    return out, STORIES


def test_layout_names_dtypes_shapes(rtn_ckpt):
    out, src = rtn_ckpt
    index = json.loads((out / "model.safetensors.index.json").read_text())  # 100KB shards: really sharded
    assert len(set(index["weight_map"].values())) > 1
    tensors = {}
    for f in set(index["weight_map"].values()):
        tensors.update(load_file(out / f))
    assert set(tensors) == set(index["weight_map"])
    orig = load_file(src / "model.safetensors")
    for name, w in orig.items():
        if name.endswith("proj.weight"):
            base = name[: -len("weight")]
            out_f, in_f = w.shape
            assert tensors[base + "qweight"].dtype == torch.int32 and tensors[base + "qweight"].shape == (-(-in_f * 4 // 32), out_f)
            assert tensors[base + "qzeros"].dtype == torch.int32 and tensors[base + "qzeros"].shape == (-(-in_f // 32), -(-out_f * 4 // 32))
            assert tensors[base + "scales"].dtype == torch.float16 and tensors[base + "scales"].shape == (-(-in_f // 32), out_f)
            assert tensors[base + "g_idx"].dtype == torch.int32 and tensors[base + "g_idx"].shape == (in_f,)
            assert name not in tensors
        else:
            assert torch.equal(tensors[name], w)  # unquantized tensors copied exactly (fp32 output)
    assert "lm_head.weight" not in tensors  # tied: stored once
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == 4 and q["group_size"] == 32 and q["sym"] is True
    assert q["desc_act"] is False and q["checkpoint_format"] == "gptq"
    assert (out / "tokenizer.json").is_file()


def test_provenance_hashes(rtn_ckpt):
    out, src = rtn_ckpt
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    assert prov["source"]["files_sha256"]["model.safetensors"] == sha256_file(src / "model.safetensors")
    for name, digest in prov["files_sha256"].items():
        assert sha256_file(out / name) == digest
    assert prov["recipe"]["method"] == "rtn" and prov["llmq_version"]


def test_reload_equals_independent_rtn(rtn_ckpt):
    """Loaded weights equal RTN applied directly to the original tensors (no pipeline involved)."""
    out, src = rtn_ckpt
    model, _ = load_model(str(out))
    orig = load_file(src / "model.safetensors")
    spec = IntGrid(4, 32, True)
    sd = model.state_dict()
    for name, w in orig.items():
        if name.endswith("proj.weight"):
            assert torch.equal(sd[name], rtn_quantize(w, spec).dequantize())
    assert torch.equal(model.lm_head.weight, orig["model.embed_tokens.weight"])


def test_streamed_shards_open_with_safetensors(rtn_ckpt):
    out, _ = rtn_ckpt
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            assert st.metadata()["format"] == "pt"
            for k in st.keys():
                st.get_tensor(k)


def test_a_second_skeleton_keeps_the_tied_head(stories):
    """has_tensor answers for a tied name once the map exists: a second skeleton must not lose the map (the
    head would then be read as a tensor of its own, which the checkpoint lacks)."""
    source = ModelSource(str(stories))
    source.skeleton(torch.float32)
    first = dict(source.tied)
    source.skeleton(torch.float32)
    assert first and source.tied == first


def test_a_tensor_is_read_and_written_as_safetensors_does(tmp_path):
    """llmq reads each tensor at its header's offsets (the header parsed once per file) and writes with its own
    writer: every dtype it knows, an empty tensor and a scalar round-trip with safetensors' own reader and
    writer, bit for bit."""
    from safetensors.torch import save_file

    from llmq.safetensors_stream import DTYPES, Header, ShardedWriter

    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{name}": (torch.randn(3, 5, generator=g) * 100).to(dtype) for name, dtype in DTYPES.items()
               if dtype not in (torch.uint16, torch.uint32, torch.uint64)}
    tensors |= {"u16": torch.arange(7, dtype=torch.int32).to(torch.uint16), "empty": torch.zeros(0, 4),
                "scalar": torch.tensor(2.5, dtype=torch.float64), "big": torch.randn(1000, 33, generator=g)}
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, theirs)
    writer = ShardedWriter(tmp_path / "ours", 2**30)
    (tmp_path / "ours").mkdir()
    for key, t in tensors.items():
        writer.add(key, t)
    [ours] = writer.finish()
    for written, read in ((theirs, "llmq"), (ours, "safetensors")):
        header = Header(written)
        with safe_open(str(written), framework="pt") as st:
            for key, want in tensors.items():
                got = header.read(written, key) if read == "llmq" else st.get_tensor(key)
                assert got.dtype == want.dtype and got.shape == want.shape, (written.name, key)
                assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), (written.name, key)
