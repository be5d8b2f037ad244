"""GPTQ fitted to the unquantized model's outputs (fp_targets, the asymmetric calibration of GPTAQ)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import layer_inputs, save_tiny
from llmq.activations import layer_hidden
from llmq.methods.gptq import Hessian, Unquantized
from llmq.pipeline import quantize_model
from llmq.recipe import build_config
from llmq.source import ModelSource


def _paired(n=16, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    x = x0 + 0.3 * torch.randn(tokens, n, generator=g, dtype=torch.float64)  # the quantized model's inputs drift
    W = torch.randn(8, n, generator=g, dtype=torch.float64)
    h = Hessian(n, torch.float64)
    for a, b in zip(x.split(100), x0.split(100)):  # several batches, as the pipeline adds them
        h.add(a, b)
    return x, x0, W, h


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_target_turns_the_mixed_loss_into_gptqs(weight):
    """For any Q: (1-a)|Qx - Wx|² + a|Qx - Wx0|² - |(Q - W')x|² is one constant (the normal equations), and
    W' at weight 1 is the least-squares solution (lstsq, computed independently)."""
    x, x0, W, h = _paired()
    target = h.target(W, weight, damp=1e-12)
    g = torch.Generator().manual_seed(1)
    gaps = []
    for _ in range(4):
        Q = W + torch.randn(W.shape, generator=g, dtype=torch.float64)
        mixed = (1 - weight) * ((Q - W) @ x.T).pow(2).sum() + weight * (Q @ x.T - W @ x0.T).pow(2).sum()
        gaps.append(float(mixed - ((Q - target) @ x.T).pow(2).sum()))
    assert max(gaps) - min(gaps) < 1e-6 * abs(gaps[0]) + 1e-6
    if weight == 1.0:
        ls = torch.linalg.lstsq(x, x0 @ W.T).solution.T
        torch.testing.assert_close(target, ls, rtol=1e-8, atol=1e-8)


def test_float32_target_matches_the_damped_normal_equations():
    """H's default dtype solves in float32 (the sums stay float64): the correction agrees with the damped normal
    equations written out here in float64, W + W (Σ x0 xᵀ - Σ x xᵀ)(Σ x xᵀ + damp·mean diag·I)⁻¹, to float32's
    precision, not to a coarser one."""
    x, x0, W, _ = _paired(n=64, tokens=2000)
    x, x0 = x.float().double(), x0.float().double()  # (the values the float32 Hessian sees)
    h = Hessian(64)
    for a, b in zip(x.split(500), x0.split(500)):
        h.add(a.float(), b.float())
    S = x.T @ x
    ref = W + W @ (x0.T @ x - S) @ torch.linalg.inv(S + 0.01 * S.diagonal().mean() * torch.eye(64, dtype=S.dtype))
    target = h.target(W.float(), 1.0, 0.01)
    assert target.dtype == torch.float32
    assert float((target.double() - ref).norm()) < 1e-4 * float((ref - W).norm())
    assert float((ref - W).norm()) > 0.05 * float(W.norm())  # (the correction is not negligible)


def test_unpaired_or_unweighted_targets_are_the_weights():
    x, x0, W, h = _paired()
    assert torch.equal(h.target(W, 0.0, 0.01), W)
    h.add(x[:5], x0[:3])  # a call whose rows do not match (a MoE expert's routed tokens)
    assert not h.paired and torch.equal(h.target(W, 1.0, 0.01), W)


def test_feeder_pairs_every_token_and_skips_routed_experts():
    """The unquantized inputs handed to the observers are exactly the linears' inputs in the unquantized
    layer (a forward hook collects them independently); a MoE expert's routed rows are not handed over."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    from llmq.arch import get_module
    from llmq.experts import unfuse_experts

    assert unfuse_experts(model) > 0
    arch, inputs = layer_inputs(model, torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)))
    layer = get_module(model, arch.layers)[0]
    names = ["self_attn.q_proj", "self_attn.o_proj"] + [n for n, _ in layer.named_modules() if n.endswith("experts.0.down_proj")]
    unq = Unquantized.of(layer, inputs, None)
    seen: dict[str, torch.Tensor] = {}
    feed = unq.feeder(names, seen)
    own = {}
    hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: own.setdefault(n, a[0])) for n in names]
    feed(0)  # the first batch's unquantized inputs
    x = torch.cat(inputs.hidden[: inputs.batch_size])
    with torch.no_grad():
        layer(x, **inputs.kwargs)
    for h in hooks:
        h.remove()
    assert set(seen) == {"self_attn.q_proj", "self_attn.o_proj"}
    for n in seen:
        torch.testing.assert_close(seen[n], own[n])


@pytest.mark.parametrize("last", [False, True])
def test_unquantized_outputs_are_the_layers_forward(last):
    """The unquantized outputs handed to the next layer are a plain forward of the layer as it was, whether
    a pass of their own computes them or the last feeder's passes ran on to keep them (a pass of the
    quantized layer, changed in place meanwhile, must not leak into either)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    from llmq.arch import get_module

    arch, inputs = layer_inputs(model, torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0)))
    inputs.batch_size = 4  # (two batches, the second short)
    layer = get_module(model, arch.layers)[0]
    with torch.no_grad():
        want = [layer_hidden(layer(h, **inputs.kwargs)) for h in inputs.hidden]
    unq = Unquantized.of(layer, inputs, None)
    with torch.no_grad():
        layer.mlp.down_proj.weight.mul_(0.5)  # (the layer being quantized moves; its copy must not)
    seen: dict[str, torch.Tensor] = {}
    feed = unq.feeder(["mlp.down_proj"], seen, last=last)
    for b in range(2):
        feed(b)
        assert "mlp.down_proj" in seen
    passes = []
    hook = unq.layer.register_forward_hook(lambda *a: passes.append(1))
    got = unq.outputs()
    hook.remove()
    assert len(passes) == (0 if last else 2)  # (kept by the last feeder: no pass of its own)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_first_inputs_give_gptqs_codes_later_ones_move(tmp_path):
    """q/k/v of layer 0 read the same inputs in the quantized and the unquantized model, so their target is W
    and their codes are plain GPTQ's (a misaligned pairing would move them); after them the inputs differ."""
    src = save_tiny("llama", tmp_path / "src")
    recipe = {"method": "gptq", "bits": 3, "group_size": 32, "seqlen": 32, "nsamples": 16, "dtype": "float32"}
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    for name, extra in [("plain", {}), ("fpt", {"fp_targets": 1.0})]:
        quantize_model(ModelSource(str(src)), build_config({}, {**recipe, **extra}), tmp_path / name, progress=False,
                       calib_ids=ids)
    plain, fpt = (load_file(tmp_path / n / "model.safetensors") for n in ("plain", "fpt"))
    first = [k for k in plain if k.endswith(".qweight") and ".layers.0.self_attn." in k and "o_proj" not in k]
    later = [k for k in plain if k.endswith(".qweight") and k not in first]
    assert first and later
    assert all(torch.equal(plain[k], fpt[k]) for k in first)
    assert any(not torch.equal(plain[k], fpt[k]) for k in later)


def test_awq_gptq_refuses_fp_targets():
    """Its GPTQ stage is made afresh per layer, so nothing would carry the activations: refused, not ignored."""
    from llmq.errors import LlmqError
    from llmq.methods import options_for

    with pytest.raises(LlmqError, match="awq\\+gptq does not take fp_targets"):
        options_for("awq+gptq", {"fp_targets": 1.0})
    assert options_for("gptq", {"fp_targets": 1.0}).fp_targets == 1.0


def test_every_solve_gets_the_unquantized_inputs_of_every_batch(tmp_path, monkeypatch):
    """Each solve's Hessian is paired with the unquantized inputs of every batch.  A pass that served a block
    from kept tensors skipped its observed linears for a batch, which silently turned fp_targets off for the
    whole MLP (unpaired: the target is W), as happened once."""
    paired = []
    real = Hessian.target

    def target(self, W, weight, damp):
        paired.append(self.paired and self._cross is not None)
        return real(self, W, weight, damp)

    monkeypatch.setattr(Hessian, "target", target)
    src = save_tiny("llama", tmp_path / "src")
    recipe = {"method": "gptq", "bits": 3, "group_size": 32, "seqlen": 32, "nsamples": 16, "dtype": "float32",
              "fp_targets": 1.0}
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(ModelSource(str(src)), build_config({}, recipe), tmp_path / "q", progress=False, calib_ids=ids)
    assert len(paired) >= 8 and all(paired), paired
