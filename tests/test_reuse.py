"""Reuse across true-sequential passes: what a later pass takes from an earlier one gives exactly the
outputs of plain forwards, skips the work it claims to skip, and is refused where it would be wrong."""

from __future__ import annotations

import torch
from torch import nn

from conftest import layer_inputs, tiny_config
from llmq.arch import get_module
from llmq.reuse import Reuse

STEPS = (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
         ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"])


def _llama(family: str = "llama", inter: int = 128):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers=1, inter=inter)).eval()
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    arch, inputs = layer_inputs(model, ids, batch_size=2)
    return get_module(model, arch.layers)[0], inputs


def _plain(layer: nn.Module, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = [layer(torch.cat(inputs.hidden[i : i + 2]), **inputs.kwargs) for i in range(0, len(inputs.hidden), 2)]
    return [y[0] if isinstance(y, tuple) else y for y in outs]


def _sequential(layer: nn.Module, inputs, reuse: Reuse | None) -> tuple[list[torch.Tensor], dict[str, int]]:
    """GPTQ's passes: observe a step's inputs, then change its weights (as a quantizer would) and mark them
    final; then the outputs.  Returns the outputs (batched) and how often each linear ran."""
    calls: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda m, a, y, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    inputs.reuse = reuse
    for step in STEPS:
        inputs.run(layer, {layer.get_submodule(n): lambda x: None for n in step})
        for n in step:
            lin = layer.get_submodule(n)
            lin.weight.data = (lin.weight.data * 16).round() / 16  # "quantized"
            if reuse is not None:
                reuse.pending.discard(lin)
    out = inputs.run(layer, keep_outputs=True)
    inputs.reuse = None
    for h in hooks:
        h.remove()
    return [torch.cat(out[i : i + 2]) for i in range(0, len(out), 2)], calls


def test_passes_with_reuse_give_the_plain_outputs_and_skip_attention():
    layer, inputs = _llama()
    reuse = Reuse(layer, pending={layer.get_submodule(n) for s in STEPS for n in s})
    reuse.learn(inputs.hidden[0], inputs.kwargs)
    got, calls = _sequential(layer, inputs, reuse)
    expected = _plain(layer, inputs)  # (the weights are the "quantized" ones now)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # q_proj runs in the o_proj pass (3 batches) and in the first, checked, batch of the q/k/v pass (whose
    # other batches stop at q_proj's input).  The attention block of the gate/up pass is o_proj alone on the
    # kept input (3 calls); o_proj being final then, its outputs serve the last two passes (no calls),
    # besides the first batches of the q/k/v and o_proj passes.
    assert calls["self_attn.q_proj"] == 3 + 1
    assert calls["self_attn.o_proj"] == 3 + 2
    # The MLP of the outputs' pass is down_proj alone on the input the down_proj pass kept: gate_proj runs
    # in the down_proj pass and in the first, checked, batches of the three passes before it.
    assert calls["mlp.gate_proj"] == 3 + 3


def test_a_final_block_still_shows_its_inner_linears_their_inputs():
    """The unquantized copy fp_targets runs alongside (nothing pending): a pass observing gate/up must see
    their inputs in every batch, even where an earlier full pass kept what would serve the whole MLP."""
    layer, inputs = _llama()
    reuse = Reuse(layer)
    reuse.learn(inputs.hidden[0], inputs.kwargs)
    inputs.reuse = reuse
    batches = len(inputs.hidden) // inputs.batch_size
    for step in STEPS:
        seen: list[str] = []
        inputs.run(layer, {layer.get_submodule(n): lambda x, n=n: seen.append(n) for n in step})
        assert sorted(seen) == sorted(step * batches), step
    inputs.reuse = None


def test_a_still_changing_linear_before_the_block_keeps_nothing():
    layer, inputs = _llama()
    reuse = Reuse(layer, pending={layer.get_submodule(n) for s in STEPS for n in s})
    reuse.learn(inputs.hidden[0], inputs.kwargs)
    reuse.pending.add(nn.Linear(1, 1))  # (a stranger: harmless)
    inputs.reuse = reuse
    inputs.run(layer, {layer.get_submodule("self_attn.o_proj"): lambda x: None})  # q/k/v still pending
    assert not reuse._kept
    inputs.reuse = None


class _Scaled(nn.Module):
    """An attention block that scales o_proj's output: its output is not o_proj's tensor."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, *args, **kwargs):
        y, w = self.attn(*args, **kwargs)
        return y * 0.5, w


def test_a_block_that_does_more_after_its_last_linear_is_computed_in_full():
    layer, inputs = _llama()
    layer.self_attn = _Scaled(layer.self_attn)
    steps = [["self_attn.attn." + n.split(".", 1)[1] for n in s] if s[0].startswith("self_attn") else s for s in STEPS]
    reuse = Reuse(layer, pending={layer.get_submodule(n) for s in steps for n in s})
    reuse.learn(inputs.hidden[0], inputs.kwargs)
    assert "self_attn" not in reuse._ends and "mlp" in reuse._ends
    expected = _plain(layer, inputs)
    inputs.reuse = reuse
    assert all(torch.equal(a, b) for a, b in zip(torch.cat(inputs.run(layer, keep_outputs=True)).split(2), expected))


def test_advance_lets_go_of_inputs_and_kept_tensors_as_it_goes():
    """advance (the last pass) gives the plain outputs, leaves nothing kept, and does not empty a list of
    inputs another holder shares (an unquantized copy of the layer reads the same list)."""
    layer, inputs = _llama()
    reuse = Reuse(layer, pending={layer.get_submodule(n) for s in STEPS for n in s})
    reuse.learn(inputs.hidden[0], inputs.kwargs)
    inputs.reuse = reuse
    for step in STEPS:
        inputs.run(layer, {layer.get_submodule(n): lambda x: None for n in step})
        reuse.pending.difference_update(layer.get_submodule(n) for n in step)
    assert reuse._kept
    shared = inputs.hidden
    before = [h.clone() for h in shared]
    expected = _plain(layer, inputs)
    inputs.advance(layer)
    assert not reuse._kept
    assert all(h is not None for h in shared) and all(torch.equal(a, b) for a, b in zip(shared, before))
    assert all(torch.equal(a, b) for a, b in zip((torch.cat(inputs.hidden[i : i + 2]) for i in range(0, 6, 2)), expected))


def test_a_wide_mlp_input_is_spilled_to_a_file_and_serves_the_outputs_pass():
    """down_proj's input, wider than twice the hidden size, is kept out of the process's memory (a temporary
    file), and the outputs' pass reads it back instead of running gate/up_proj again: same outputs."""
    layer, inputs = _llama(inter=192)
    reuse = Reuse(layer, pending={layer.get_submodule(n) for s in STEPS for n in s})
    reuse.learn(inputs.hidden[0], inputs.kwargs)
    got, calls = _sequential(layer, inputs, reuse)
    assert all(torch.equal(a, b) for a, b in zip(got, _plain(layer, inputs)))
    assert calls["mlp.gate_proj"] == 3 + 3  # (the down_proj pass, and the checked batches before it)
    assert not any(name == "mlp" for _, name in reuse._kept) and all((b, "mlp") in reuse._spill for b in range(3))
    reuse.close()
    assert reuse._spill._file is None and not reuse._kept and not reuse._outputs


def test_a_spill_that_cannot_write_recomputes_instead(monkeypatch):
    layer, inputs = _llama(inter=192)
    reuse = Reuse(layer, pending={layer.get_submodule(n) for s in STEPS for n in s})
    reuse.learn(inputs.hidden[0], inputs.kwargs)

    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("llmq.reuse.os.pwrite", full)
    got, calls = _sequential(layer, inputs, reuse)
    assert all(torch.equal(a, b) for a, b in zip(got, _plain(layer, inputs)))
    assert reuse._spill.broken and calls["mlp.gate_proj"] == 3 + 3 + 3  # (the outputs' pass runs them again)


def test_the_spill_gives_back_every_dtype_bit_for_bit():
    from llmq.reuse import Spill

    spill = Spill()
    tensors = {(0, "a"): torch.randn(3, 5, 7), (1, "a"): torch.randn(4, 9).bfloat16(),
               (0, "b"): torch.randn(2, 3).half().t(), (2, "c"): torch.arange(10)}  # (a transposed one too)
    for k, t in tensors.items():
        spill.put(k, t)
    for k, t in reversed(tensors.items()):
        back = spill.get(k)
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    assert spill.get((0, "a"), forget=True) is not None and spill.get((0, "a")) is None
    spill.close()
