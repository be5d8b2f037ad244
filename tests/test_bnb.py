"""bitsandbytes: NF4/FP4/LLM.int8 grids, calibrated methods on them, and the checkpoint layout transformers
saves.  Checked against bitsandbytes itself and transformers' loader where bitsandbytes is installed
(the optional `bnb` extra); the layout round-trips without it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import C4, REF6M, STORIES, need
from llmq.formats.bitsandbytes.layout import BitsAndBytesFormat
from llmq.formats.bitsandbytes.grids import FourBitGrid, Int8RowGrid, NestedAbsmax, code_table, dynamic_map
from llmq.checkpoint import load_model
from llmq.errors import LlmqError
from llmq.methods.gptq import gptq_quantize, relative_error
from llmq.methods.rtn import rtn_quantize
from llmq.pipeline import quantize_model
from llmq.recipe import build_config
from llmq.source import ModelSource

GRIDS = [FourBitGrid("nf4"), FourBitGrid("fp4"), FourBitGrid("nf4", double_quant=True), FourBitGrid("fp4", double_quant=True),
         Int8RowGrid()]
IDS = lambda g: g.name.replace(" ", "-")  # noqa: E731


def _weights(rows=96, cols=512, seed=0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[2, 64:128] = 0  # an all-zero block
    w[5, :10] += 0.8  # an outlier block
    return w


@pytest.mark.parametrize("grid", GRIDS, ids=IDS)
def test_layout_round_trips_and_sizes(grid):
    """pack -> unpack gives back the same codes, scales and double-quant state; nbytes counts what pack writes."""
    fmt = BitsAndBytesFormat("float32")
    qt = rtn_quantize(_weights(), grid)
    packed = fmt.pack(qt)
    back = fmt.unpack(packed, grid, qt.shape)
    assert back.grid == grid and torch.equal(back.codes, qt.codes) and torch.equal(back.scales, qt.scales)
    assert torch.equal(back.dequantize(), qt.dequantize())
    written = sum(t.numel() * t.element_size() for t in packed.values())
    # exact, but for the printed digits of the double-quant offset in the quant-state JSON
    assert abs(fmt.nbytes(*qt.shape, grid) - written) <= (3 if getattr(grid, "double_quant", False) else 0)


def test_four_bit_values_are_the_table_times_the_absmax():
    w = _weights()
    qt = rtn_quantize(w, FourBitGrid("nf4"))
    absmax = w.abs().reshape(96, -1, 64).amax(-1)
    assert torch.equal(qt.scales, absmax)
    assert torch.equal(qt.dequantize(), code_table("nf4")[qt.codes.long()] * absmax.repeat_interleave(64, dim=1))
    # each value's code is its nearest table entry (a naive search over the 16 values)
    naive = ((w / absmax.repeat_interleave(64, 1).clamp(min=1e-38))[..., None] - code_table("nf4")).abs().argmin(-1)
    ok = w.abs().reshape(96, -1, 64).amax(-1).repeat_interleave(64, 1) > 0
    assert (qt.codes.long()[ok] == naive[ok]).float().mean() > 0.9999


def test_double_quantization_recovers_the_absmax_closely():
    a = torch.rand(1000) * 0.1 + 0.01
    nested = NestedAbsmax.of(a)
    assert nested.codes.dtype == torch.uint8 and nested.absmax.numel() == 4
    assert (nested.values() - a).abs().max() < 0.01 * a.max()
    assert dynamic_map().numel() == 256 and torch.all(dynamic_map()[1:] >= dynamic_map()[:-1])


@pytest.mark.parametrize("grid", [FourBitGrid("nf4"), FourBitGrid("nf4", double_quant=True), Int8RowGrid()], ids=IDS)
def test_gptq_on_bitsandbytes_grids_beats_rounding(grid):
    """Error feedback against the fixed per-block absmax: lower ||WX - QX||^2 than bitsandbytes' own rounding,
    on the same stored grid (same absmax values)."""
    w = _weights(64, 256, 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1
    H = 2 * x.T @ x / len(x)
    q, _ = gptq_quantize(w, H, grid, act_order=True)
    r = rtn_quantize(w, grid)
    assert torch.equal(q.scales, r.scales)  # the grid is fixed before GPTQ
    assert relative_error(w, q.dequantize(), H) < 0.8 * relative_error(w, r.dequantize(), H)


@pytest.mark.parametrize("dq", [False, True])
def test_rows_of_no_whole_blocks_are_quantized_across_rows(dq):
    """A 172-wide linear (stories260K's down_proj): blocks of 64 run across rows, as bitsandbytes lays them; every
    value carries its block's absmax, and the layout round-trips."""
    w = _weights(64, 172, 4)
    grid = FourBitGrid("nf4", 64, dq).for_width(172)
    assert grid.flat and grid.group_size == 1 and not grid.rows_independent
    qt = rtn_quantize(w, grid)
    blocks = torch.nn.functional.pad(w.reshape(-1).abs(), (0, -w.numel() % 64)).reshape(-1, 64).amax(1)
    if not dq:
        assert torch.equal(qt.scales.reshape(-1), torch.repeat_interleave(blocks, 64)[: w.numel()])
    fmt = BitsAndBytesFormat("float32")
    back = fmt.unpack(fmt.pack(qt), grid, qt.shape)
    assert torch.equal(back.dequantize(), qt.dequantize()) and back.grid == grid
    assert abs(fmt.nbytes(64, 172, grid) - sum(t.numel() * t.element_size() for t in fmt.pack(qt).values())) <= (3 if dq else 0)


def test_every_stories260k_linear_is_quantized(tmp_path):
    stats = quantize_model(ModelSource(str(need(STORIES))), build_config({}, {"method": "gptq", "format": "bitsandbytes", "bits": 4,
                                                                               "nsamples": 4, "seqlen": 64, "dataset": str(need(C4))}),
                           tmp_path / "q", progress=False)
    assert stats.notes == [] and stats.quantized == 5 * 7
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert q["llm_int8_skip_modules"] == ["lm_head"] and q["load_in_4bit"] is True


@pytest.mark.parametrize("flags", [{"bits": 4}, {"bits": 8}], ids=["nf4", "int8"])
def test_projection_is_what_quantize_writes(tmp_path, flags):
    """The size projection (the report's 7B column) counts exactly the bytes of the linears llmq writes."""
    from llmq.projection import meta_model, project

    need(REF6M)
    cfg = build_config({}, {"method": "rtn", "format": "bitsandbytes", **flags})
    quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "q", progress=False)
    written = sum(t.numel() * t.element_size() for k, t in load_file(tmp_path / "q" / "model.safetensors").items()
                  if ".layers." in k and not k.endswith("norm.weight"))
    assert project(meta_model(REF6M / "config.json"), cfg)["quantized_linears"] == written


def test_bitsandbytes_needs_4_or_8_bits():
    with pytest.raises(LlmqError, match="4-bit"):
        build_config({}, {"format": "bitsandbytes", "bits": 3})
    from llmq.grid import IntGrid

    with pytest.raises(LlmqError, match="cannot represent"):
        BitsAndBytesFormat().check(IntGrid(4, 128))


# ---- against bitsandbytes and transformers ------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_rtn_is_bitsandbytes_own_quantization(quant_type, dq):
    """Codes and absmax byte for byte as bitsandbytes' quantize_4bit makes them (double quantization: the 4-bit
    codes, second-level absmax and offset too; its 8-bit absmax codes are the nearest ones, where bitsandbytes'
    CPU kernel, whose binary search is approximate, picks a neighbour for a few values in a thousand)."""
    F = pytest.importorskip("bitsandbytes.functional")
    for w in (_weights(), _weights(64, 172, 5)):  # (rows of whole blocks, and blocks across rows)
        _same_as_bitsandbytes(F, w, quant_type, dq)


def _same_as_bitsandbytes(F, w, quant_type, dq):
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
    qt = rtn_quantize(w, FourBitGrid(quant_type, 64, dq).for_width(w.shape[1]))
    ours = BitsAndBytesFormat("float32").pack(qt)
    assert torch.equal(ours["weight"], packed)
    if not dq:
        assert torch.equal(ours["weight.absmax"], state.absmax)
        assert torch.equal(F.dequantize_4bit(packed, state).float(), qt.dequantize())
        return
    assert torch.equal(ours["weight.nested_absmax"], state.state2.absmax)
    assert json.loads(bytes(ours[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))["nested_offset"] == float(state.offset)
    assert (ours["weight.absmax"] == state.absmax).float().mean() > 0.99
    code = dynamic_map()
    blocks = torch.nn.functional.pad(w.reshape(-1).abs(), (0, -w.numel() % 64)).reshape(-1, 64).amax(1)
    x = (blocks - state.offset) / torch.repeat_interleave(state.state2.absmax, 256)[: state.absmax.numel()]
    assert ((code[ours["weight.absmax"].long()] - x).abs() <= (code[state.absmax.long()] - x).abs() + 1e-7).all()


def test_rtn_int8_is_bitsandbytes_own_quantization():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(3)).half().float()
    CB, SCB, _ = F.int8_vectorwise_quant(w.half())
    ours = BitsAndBytesFormat().pack(rtn_quantize(w, Int8RowGrid()))
    assert torch.equal(ours["weight"], CB) and torch.equal(ours["SCB"], SCB.float())


@pytest.mark.parametrize("flags", [{"bits": 4}, {"bits": 4, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
                                   {"bits": 8}], ids=["nf4", "fp4-dq", "int8"])
def test_transformers_loads_llmqs_checkpoint(tmp_path, flags):
    """from_pretrained(dir) builds bitsandbytes layers from llmq's GPTQ-calibrated file; bitsandbytes dequantizes
    exactly llmq's values (4-bit), and the logits are llmq's dequantized model's within fp16 rounding (LLM.int8
    also rounds the activations to 8 bits: within 2%)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    need(REF6M)
    cfg = build_config({}, {"method": "gptq", "format": "bitsandbytes", "dataset": str(need(C4)), "nsamples": 8, "seqlen": 64,
                            "dtype": "float16", **flags})
    quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "q", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    layer = hf.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear4bit" if flags["bits"] == 4 else "Linear8bitLt")
    ours, _ = load_model(str(tmp_path / "q"), torch.float16)
    if flags["bits"] == 4:
        import bitsandbytes.functional as F

        theirs = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert torch.equal(theirs, ours.model.layers[0].self_attn.q_proj.weight.float())
    ids = torch.randint(3, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(ids).logits.float(), ours(ids).logits.float()
    assert (a - b).abs().max() < (0.02 if flags["bits"] == 8 else 0.005) * a.abs().max()


@pytest.mark.parametrize("kw", [dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
                                dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), dict(load_in_8bit=True)],
                         ids=["nf4-dq", "fp4", "int8"])
def test_llmq_reads_a_checkpoint_transformers_saved(tmp_path, kw):
    """A bitsandbytes checkpoint saved by transformers: llmq's loader (eval, export) gets the weights bitsandbytes
    dequantizes, and computes transformers' logits."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    need(REF6M)
    theirs = AutoModelForCausalLM.from_pretrained(REF6M, quantization_config=BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **kw),
                                                  dtype=torch.float32).eval()
    theirs.save_pretrained(tmp_path / "bnb")
    ours, _ = load_model(str(tmp_path / "bnb"))
    layer = theirs.model.layers[1].mlp.down_proj
    if "load_in_4bit" in kw:
        import bitsandbytes.functional as F

        want = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    else:
        want = layer.weight.data.float() * layer.weight.SCB.float()[:, None] * 7.874015718698502e-3
    assert torch.equal(ours.model.layers[1].mlp.down_proj.weight, want)
    ids = torch.randint(3, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = theirs(ids).logits.float(), ours(ids).logits.float()
    assert (a - b).abs().max() < (0.02 if "load_in_8bit" in kw else 0.005) * a.abs().max()
    from llmq.export import export_checkpoint

    export_checkpoint(str(tmp_path / "bnb"), "fp32", tmp_path / "plain")
    assert torch.equal(load_file(tmp_path / "plain" / "model.safetensors")["model.layers.1.mlp.down_proj.weight"], want)
