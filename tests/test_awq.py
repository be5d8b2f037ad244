"""AWQ: folding the searched scales leaves every family's layer function unchanged (before rounding)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import layer_inputs, tiny_config
from llmq.arch import ARCHS, get_module
from llmq.methods import options_for
from llmq.recipe import build_config
from llmq.grid import IntGrid
from llmq.arch import ScaleGroup
from llmq.methods.awq import AWQ, can_fold, commutes, fake_quantize, fold_scales, search_clip


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "opt", "gpt_neox", "phi3", "gemma", "gemma2", "gemma3_text",
            "olmo2", "exaone4", "cohere", "granite", "stablelm", "starcoder2", "glm4", "arcee", "apertus"]


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
    # The table's every foldable group is right for this family (the run-time guard would otherwise
    # skip it, and the function check below could not tell).
    x = inputs.first_batch()
    with torch.no_grad():
        ref = layer(x, **inputs.kwargs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    for g in arch.scaling:
        if can_fold(layer, g):
            assert commutes(layer, g, x, inputs.kwargs, ref, 1e-3), f"{g.prev} -> {g.linears} does not commute"
    scaled = copy.deepcopy(layer)
    cfg = build_config({}, {"method": "awq", "bits": 3, "group_size": 16, "awq_clip": False})
    notes = AWQ(options_for("awq", cfg.options)).scale_and_clip(scaled, arch, {n: IntGrid(3, 16) for n in arch.linears()}, inputs)
    assert notes, "no scaling group was applicable"
    changed = [n for (n, a), (_, b) in zip(layer.named_parameters(), scaled.named_parameters()) if not torch.equal(a, b)]
    assert changed, "the search folded nothing"
    with torch.no_grad():
        for x in inputs.hidden:
            ref = layer(x, **inputs.kwargs)
            out = scaled(x, **inputs.kwargs)
            ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def _randomised(model_type: str, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.ndim == 1:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    return model, layer_inputs(model, ids)


def test_guard_rejects_a_fold_the_wiring_does_not_allow():
    """Gemma 2 normalises the attention output with post_attention_layernorm: the Llama table's
    norm -> gate/up group would scale the residual branch, and the guard must say so."""
    model, (arch, inputs) = _randomised("gemma2")
    layer = get_module(model, arch.layers)[0]
    x = inputs.first_batch()
    with torch.no_grad():
        ref = layer(x, **inputs.kwargs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    before = copy.deepcopy(layer.state_dict())
    wrong = ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp")
    right = ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp")
    assert can_fold(layer, wrong) and not commutes(layer, wrong, x, inputs.kwargs, ref, 1e-3)
    assert commutes(layer, right, x, inputs.kwargs, ref, 1e-3)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the trial folds were undone exactly


def test_awq_skips_groups_a_config_variant_breaks(caplog):
    """StableLM with parallel residuals feeds attention and the MLP from input_layernorm (and has no
    post_attention_layernorm): the family table's groups do not apply; AWQ must keep the function."""
    model, (arch, inputs) = _randomised("stablelm", use_parallel_residual=True)
    layer = get_module(model, arch.layers)[0]
    assert layer.post_attention_layernorm is None
    scaled = copy.deepcopy(layer)
    cfg = build_config({}, {"method": "awq", "bits": 3, "group_size": 16, "awq_clip": False})
    with caplog.at_level("WARNING", logger="llmq.awq"):
        notes = AWQ(options_for("awq", cfg.options)).scale_and_clip(scaled, arch, {n: IntGrid(3, 16) for n in arch.linears()}, inputs)
    assert "input_layernorm" in caplog.text
    assert "self_attn.q_proj" not in notes and "mlp.down_proj" in notes
    x = inputs.first_batch()
    with torch.no_grad():
        ref, out = layer(x, **inputs.kwargs), scaled(x, **inputs.kwargs)
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
    spec = IntGrid(3, 32, True)
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


def _moe_layer(num_experts: int, top_k: int, moe_inter: int, seq: int):
    """(layer, arch, LayerInputs) of a one-layer random Qwen3-MoE with its experts unfused as load_model
    does, fed 8 random sequences of ``seq`` tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmq.experts import unfuse_experts

    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, head_dim=16,
                               num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_inter,
                               pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    unfuse_experts(model)
    ids = torch.randint(3, 128, (8, seq), generator=torch.Generator().manual_seed(0))
    arch, inputs = layer_inputs(model, ids)
    return get_module(model, arch.layers)[0], arch, inputs


def test_input_sample_is_drawn_from_each_linears_own_rows():
    """The clip search's inputs: for every linear at most CLIP_TOKENS rows, each one of the rows that
    linear was actually handed (a plain forward hook collects them independently), all of them when
    there are fewer, none for an expert no token reached; a MoE expert's rows are its routed tokens."""
    from llmq.experts import ExpertLinears
    from llmq.methods.awq import CLIP_TOKENS, sample_inputs

    layer, _, inputs = _moe_layer(num_experts=8, top_k=1, moe_inter=32, seq=100)
    experts = next(m for m in layer.modules() if isinstance(m, ExpertLinears))
    names = ["self_attn.o_proj"] + [n for n, m in layer.named_modules() if n.endswith("down_proj")]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in names]
    inputs.run(layer)
    for h in hooks:
        h.remove()
    got = sample_inputs(layer, names, inputs, seed=0)
    assert got["self_attn.o_proj"].shape[0] == CLIP_TOKENS < 800
    routed = {n: torch.cat(v) if v else torch.empty(0, 32) for n, v in seen.items()}
    assert len(experts) == 8 and sum(len(routed[n]) for n in names[1:]) == 800  # top-1 routing: every token once
    for n in names:
        rows = routed[n]
        if len(rows) == 0:
            assert n not in got
            continue
        assert got[n].shape[0] == min(CLIP_TOKENS, len(rows))
        d = torch.cdist(got[n].double(), rows.double())  # each sampled row is one of the linear's own rows
        assert (d.min(dim=1).values < 1e-6).all(), n
        if len(rows) <= CLIP_TOKENS:
            assert (d.min(dim=0).values < 1e-6).all(), n  # fewer rows than wanted: all of them


def test_awq_clips_every_linear_but_q_and_k():
    """Clipping reaches linears outside the scaled groups: o_proj under GQA (no v -> o fold) and the
    MoE experts, as the reference clips every linear except q/k."""
    from llmq.arch import layer_linears, trace_arch

    layer, arch, inputs = _moe_layer(num_experts=4, top_k=2, moe_inter=64, seq=64)
    arch = trace_arch(arch, layer, inputs.first_batch(), inputs.kwargs)
    spec = IntGrid(3, 32, True)
    targets = {n: spec for n in layer_linears(layer)}  # (the router is no nn.Linear)
    notes = AWQ().scale_and_clip(layer, arch, targets, inputs)
    for n in targets:
        short = n.rsplit(".", 1)[-1]
        if short in ("q_proj", "k_proj"):
            assert "clip_ratio_mean" not in notes.get(n, {}), n
            continue
        assert notes[n]["clip_ratio_mean"] < 1, n  # a range was shrunk
    assert any(n.startswith("mlp.experts.") for n in notes) and "self_attn.o_proj" in notes


@pytest.mark.parametrize("max_tokens,first_batch,expected", [(0, 0, [0, 1, 2, 3, 4, 5]), (10_000, 0, [0, 1, 2, 3, 4, 5]),
                                                              (48, 0, [0, 2, 4]), (48, 1, [1, 3, 5]), (30, 3, [1, 5])])
def test_block_search_runs_on_every_kth_batch_numbered_run_wide(monkeypatch, max_tokens, first_batch, expected):
    """search_tokens: the block errors see every k-th batch by run-wide number (so the ranks of a distributed
    run pick what one process would), k the smallest that leaves at most max_tokens; statistics see all."""
    import llmq.methods.awq as awq

    model = __import__("transformers").AutoModelForCausalLM.from_config(tiny_config("llama", layers=1)).eval()
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    arch, inputs = layer_inputs(model, ids, batch_size=1)
    layer = get_module(model, arch.layers)[0]
    group = next(g for g in arch.scaling if g.block == "self_attn")
    cap = awq._capture(layer, [group], inputs)
    xs = cap.x[group.linears[0]]
    seen = []
    real = awq._block_errors
    monkeypatch.setattr(awq, "_block_errors", lambda linears, block, got, *a: seen.append(got) or real(linears, block, got, *a))
    grids = [IntGrid(4, 32, True)] * len(group.linears)
    awq.search_scale(layer, group, xs, cap.block_kwargs[group.block], grids, max_tokens=max_tokens, first_batch=first_batch)
    assert [next(i for i, x in enumerate(xs) if x is t) for t in seen[0]] == expected
