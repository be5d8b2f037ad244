"""Layer-input observation: skipping the rest of a forward once every observer has its input
changes nothing observed; modules run twice per forward are seen twice; linears reading one
tensor share one Hessian."""

from __future__ import annotations

import torch
from torch import nn

from conftest import layer_inputs, tiny_config
from llmq.activations import LayerInputs
from llmq.arch import get_module
from llmq.methods.gptq import Hessian, InputHessians


def _tiny_llama_inputs(batch_size: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=1)).eval()
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    arch, inputs = layer_inputs(model, ids, batch_size=batch_size)
    return get_module(model, arch.layers)[0], inputs


def _plain_observation(layer: nn.Module, inputs: LayerInputs, names: list[str]) -> dict[str, list[torch.Tensor]]:
    """Inputs of ``names`` from plain hooks and a complete forward of every batch (the reference)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].clone()))
             for n in names]
    with torch.no_grad():
        for i in range(0, len(inputs.hidden), inputs.batch_size):
            layer(torch.cat(inputs.hidden[i : i + inputs.batch_size]), **inputs.kwargs)
    for h in hooks:
        h.remove()
    return seen


def test_early_stop_observes_the_same_inputs_and_skips_the_rest():
    layer, inputs = _tiny_llama_inputs()
    for names in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                  ["mlp.down_proj"]):
        expected = _plain_observation(layer, inputs, names)
        got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        ran_down, ran_last = [], []
        h = layer.get_submodule("mlp.down_proj").register_forward_hook(lambda *_: ran_down.append(1))
        h2 = layer.get_submodule(names[-1]).register_forward_hook(lambda *_: ran_last.append(1))
        inputs.run(layer, {layer.get_submodule(n): (lambda x, n=n: got[n].append(x.clone())) for n in names})
        h.remove()
        h2.remove()
        for n in names:
            assert len(got[n]) == len(expected[n]) == 3
            assert all(torch.equal(a, b) for a, b in zip(got[n], expected[n]))
        # Neither down_proj nor the group's last module (k/v_proj, up_proj read the very tensor of the first
        # one, and are shown it) runs once the observers are done (after a first checked batch per module set)
        assert len(ran_down) <= 1 and len(ran_last) <= 1


def test_a_group_reading_one_tensor_gets_the_hessians_of_every_batch():
    layer, inputs = _tiny_llama_inputs()
    inputs.run(layer, {layer.get_submodule(n): lambda x: None for n in ["self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj"]})  # (a layer before this one taught the run where to stop)
    for names in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]):
        expected = _plain_observation(layer, inputs, names)
        hessians = InputHessians({n: layer.get_submodule(n) for n in names})
        inputs.run(layer, hessians.observers())
        for n in names:
            ref = Hessian(expected[n][0].shape[-1])
            for x in expected[n]:
                ref.add(x)
            assert hessians[n].count == ref.count
            assert torch.equal(hessians[n].H, ref.H)


def test_outputs_are_complete_and_unchanged():
    layer, inputs = _tiny_llama_inputs()
    with torch.no_grad():
        outs = [layer(h, **inputs.kwargs) for h in inputs.hidden]
    expected = [y[0] if isinstance(y, tuple) else y for y in outs]
    inputs.run(layer, {layer.get_submodule("self_attn.q_proj"): lambda x: None})  # a stopped run first
    before = list(inputs.hidden)
    inputs.advance(layer)
    assert len(inputs.hidden) == len(before)
    for a, b in zip(inputs.hidden, expected):
        assert torch.allclose(a, b, atol=1e-6)


class _Twice(nn.Module):
    """A linear applied twice in one forward (weight sharing): stopping after its first call would lose data."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.after = nn.Linear(8, 8)

    def forward(self, x):
        return self.after(self.lin(torch.tanh(self.lin(x))))


def test_module_called_twice_is_observed_every_time():
    torch.manual_seed(0)
    layer = _Twice()
    inputs = LayerInputs(hidden=[torch.randn(1, 4, 8) for _ in range(5)], batch_size=2)
    calls = []
    for _ in range(2):  # the second run must not trust a check the first made
        calls.clear()
        inputs.run(layer, {layer.lin: lambda x: calls.append(x.shape[0])})
        assert calls == [2, 2, 2, 2, 1, 1]


def test_shared_input_shares_one_hessian():
    layer, inputs = _tiny_llama_inputs()
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj"]
    mods = {n: layer.get_submodule(n) for n in names}
    hs = InputHessians(mods)
    inputs.run(layer, hs.observers())  # gate_proj reads another tensor than q/k/v
    hs.release()
    assert hs["self_attn.k_proj"] is hs["self_attn.q_proj"] and hs["self_attn.v_proj"] is hs["self_attn.q_proj"]
    assert hs["mlp.gate_proj"] is not hs["self_attn.q_proj"]
    seen = _plain_observation(layer, inputs, names)
    for n in names:
        ref = Hessian(mods[n].in_features)
        for x in seen[n]:
            ref.add(x)
        assert hs[n].count == ref.count == 6 * 16
        torch.testing.assert_close(hs[n].H, ref.H)


def test_a_linear_with_its_own_data_never_becomes_an_alias():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    hs = InputHessians({"a": a, "b": b})
    obs = hs.observers()
    g = torch.Generator().manual_seed(0)
    x1, x2, y = (torch.randn(3, 4, generator=g) for _ in range(3))
    obs[a](x1)
    obs[b](x2)  # another tensor: b keeps its own Hessian
    obs[a](y)
    obs[b](y)  # now the same tensor as a's, but b already has data of its own
    ref = Hessian(4)
    ref.add(x2)
    ref.add(y)
    assert hs["b"] is not hs["a"]
    torch.testing.assert_close(hs["b"].H, ref.H)


def test_batches_hold_a_bounded_number_of_tokens():
    from llmq.activations import BATCH_TOKENS, MAX_BATCH_WINDOWS, batch_windows

    assert batch_windows(128) == MAX_BATCH_WINDOWS
    for seqlen in (512, 2048, 4096, 8192):
        b = batch_windows(seqlen)
        assert b >= 1 and (b * seqlen <= BATCH_TOKENS or b == 1) and (b + 1) * seqlen > min(BATCH_TOKENS, 8 * seqlen)
