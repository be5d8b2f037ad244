"""The declarative tables against the wiring a forward actually has, and the traced fallback for
families without a table."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import layer_inputs, save_tiny, tiny_config
from llmq.arch import ARCHS, _discover, get_module, trace_arch
from llmq.recipe import build_config
from llmq.pipeline import quantize_model
from llmq.source import ModelSource
from test_awq import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_table_matches_traced_wiring(family):
    """Each table's groups are exactly the linears that read one tensor, in the order they run, and
    each of its norm -> linears groups is a norm whose output those linears (and no others) read."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    arch, inputs = layer_inputs(model, torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0)))
    layer = get_module(model, arch.layers)[0]
    traced = trace_arch(_discover(model), layer, inputs.first_batch(), inputs.kwargs)
    assert traced.layers == arch.layers and not traced.discovered
    assert traced.sequential == arch.sequential
    norm_groups = {g for g in arch.scaling if not isinstance(layer.get_submodule(g.prev), torch.nn.Linear)}
    assert set(traced.scaling) == norm_groups


def test_untabled_family_is_traced_and_quantizes_as_its_table(tmp_path, monkeypatch):
    """A Llama with its table removed: the pipeline traces the wiring, so GPTQ runs true-sequential
    exactly as with the table (identical files), and AWQ finds the norm groups to scale."""
    src = save_tiny("llama", tmp_path / "src")
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = lambda m: build_config({}, {"method": m, "bits": 4, "group_size": 32, "seqlen": 16, "nsamples": 4,  # noqa: E731
                                      "dtype": "float32"})
    quantize_model(ModelSource(str(src)), cfg("gptq"), tmp_path / "table", progress=False, calib_ids=ids)
    monkeypatch.delitem(ARCHS, "llama")
    quantize_model(ModelSource(str(src)), cfg("gptq"), tmp_path / "traced", progress=False, calib_ids=ids)
    assert (tmp_path / "table" / "model.safetensors").read_bytes() == (tmp_path / "traced" / "model.safetensors").read_bytes()
    # Without tracing (one group, not true-sequential) the result differs: the comparison can fail.
    monkeypatch.setattr("llmq.pipeline.trace_arch", lambda arch, *a: arch)
    quantize_model(ModelSource(str(src)), cfg("gptq"), tmp_path / "flat", progress=False, calib_ids=ids)
    assert (tmp_path / "table" / "model.safetensors").read_bytes() != (tmp_path / "flat" / "model.safetensors").read_bytes()
    monkeypatch.undo()
    monkeypatch.delitem(ARCHS, "llama")
    quantize_model(ModelSource(str(src)), cfg("awq"), tmp_path / "awq", progress=False, calib_ids=ids)
    recs = [json.loads(l) for l in (tmp_path / "awq" / "llmq_quantize_log.jsonl").read_text().splitlines()]
    scaled = {r["module"] for r in recs if "alpha" in r}
    assert scaled == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
