"""AWQ: folding the searched scales leaves every family's layer function unchanged (before rounding)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import layer_inputs, tiny_config
from llmq.arch import ARCHS, get_module
from llmq.config import build_config
from llmq.grid import QuantSpec
from llmq.methods.awq import AWQ, fake_quantize, fold_scales, search_clip


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "opt", "gpt_neox", "phi3", "gemma"]


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_preserves_layer_function(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    # Trained norms are not all ones: randomise them so a wrong fold would show.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.ndim == 1:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    arch, inputs = layer_inputs(model, ids)
    assert arch is ARCHS[family]
    layer = get_module(model, arch.layers)[0]
    scaled = copy.deepcopy(layer)
    cfg = build_config({}, {"method": "awq", "bits": 3, "group_size": 16, "awq_clip": False})
    notes = AWQ(cfg).scale_and_clip(scaled, arch, {n: cfg.spec() for n in arch.linears()}, inputs)
    assert notes, "no scaling group was applicable"
    changed = [n for (n, a), (_, b) in zip(layer.named_parameters(), scaled.named_parameters()) if not torch.equal(a, b)]
    assert changed, "the search folded nothing"
    with torch.no_grad():
        for x in inputs.hidden:
            ref = layer(x, **inputs.kwargs)
            out = scaled(x, **inputs.kwargs)
            ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_fold_scales_on_linear_pair():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 6), torch.nn.Linear(6, 5)
    x = torch.randn(10, 8)
    ref = b(a(x))
    fold_scales(a, [b], torch.rand(6) + 0.5)
    assert torch.allclose(b(a(x)), ref, atol=1e-6)


def test_clip_search_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=g)
    w[:, 3] *= 8  # outliers make clipping worthwhile
    xs = [torch.randn(256, 64, generator=g)]
    spec = QuantSpec(3, 32, True)
    max_val = search_clip(w, xs, spec, torch.Generator().manual_seed(1))
    wc = torch.maximum(torch.minimum(w.reshape(40, 2, 32), max_val[..., None]), -max_val[..., None]).reshape(40, 64)
    err = lambda q: ((xs[0] @ (q - w).T) ** 2).sum().item()  # noqa: E731
    assert err(fake_quantize(wc, spec)) <= err(fake_quantize(w, spec))
    assert (max_val < w.abs().reshape(40, 2, 32).amax(2)).any()


_slow = pytest.mark.slow


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
@pytest.mark.parametrize("bits,sym,gs", [(4, True, 128), (3, False, 64),
                                         pytest.param(4, False, 64, marks=_slow), pytest.param(3, True, 32, marks=_slow),
                                         pytest.param(3, False, 128, marks=_slow), pytest.param(4, True, 32, marks=_slow)])
def test_awq_runs_and_reloads(tmp_path, method, bits, sym, gs):
    """Every bits x sym x group combination quantizes, logs its choices, and reloads to the in-memory result."""
    import json

    from conftest import save_tiny
    from llmq.checkpoint import load_model
    from llmq.pipeline import quantize_model
    from llmq.source import ModelSource

    src = save_tiny("llama", tmp_path / "src", hidden=128, inter=256)
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = build_config({}, {"method": method, "bits": bits, "sym": sym, "group_size": gs, "seqlen": 32, "nsamples": 4, "dtype": "float32"})
    stats = quantize_model(ModelSource(str(src)), cfg, tmp_path / "q", progress=False, calib_ids=ids)
    recs = [json.loads(l) for l in (tmp_path / "q" / "llmq_quantize_log.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * 7 and all("alpha" in r for r in recs if not r["module"].endswith(("o_proj",)))
    assert all("awq_mse_best" in r and r["awq_mse_best"] <= r["awq_mse_unscaled"] for r in recs if "awq_mse_best" in r)
    if method == "awq":
        assert any("clip_ratio_mean" in r for r in recs)
    model, _ = load_model(str(tmp_path / "q"))
    assert torch.isfinite(model(ids).logits).all()
    assert stats.peak_resident_layers == 1
