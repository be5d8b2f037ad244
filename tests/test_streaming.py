"""During quantize, at most one decoder layer's weights are in memory (counted at every tensor read)."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny
from llmq.arch import arch_for, get_module
from llmq.recipe import build_config
from llmq.pipeline import quantize_model
from llmq.source import ModelSource


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_one_layer_resident(tmp_path, method, monkeypatch):
    src_dir = save_tiny("llama", tmp_path / "src", layers=4)
    source = ModelSource(str(src_dir))
    seen = {"max_layers": 0, "reads": 0, "layer_tensors_outside": 0}
    real_skeleton = source.skeleton
    holder = {}

    def skeleton(dtype=torch.float32):
        model = real_skeleton(dtype)
        holder["layers"] = get_module(model, arch_for(model).layers)
        return model

    real_load = source.load_tensor

    def load_tensor(name):
        t = real_load(name)
        layers = holder["layers"]
        resident = [i for i, l in enumerate(layers) if any(p.device.type != "meta" for p in l.parameters())]
        seen["max_layers"] = max(seen["max_layers"], len(resident) + (1 if ".layers." in name and int(name.split(".")[2]) not in resident else 0))
        seen["reads"] += 1
        return t

    monkeypatch.setattr(source, "skeleton", skeleton)
    monkeypatch.setattr(source, "load_tensor", load_tensor)
    ids = torch.randint(0, 128, (4, 32))
    cfg = build_config({}, {"method": method, "bits": 4, "group_size": 32, "seqlen": 32, "nsamples": 4})
    stats = quantize_model(source, cfg, tmp_path / "out", progress=False, calib_ids=ids)
    assert seen["reads"] > 0
    assert seen["max_layers"] == 1
    assert stats.peak_resident_layers == 1
