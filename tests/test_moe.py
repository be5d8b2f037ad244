"""Mixture-of-experts layers: per-expert linears compute what transformers' fused experts compute,
GPTQ calibrates each expert on the tokens routed to it, and checkpoints carry per-expert tensors
that decode (by code written here) to a model transformers itself runs."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import layer_inputs
from llmq.arch import Arch, layer_linears, trace_arch
from llmq.checkpoint import load_model
from llmq.recipe import build_config
from llmq.errors import LlmqError
from llmq.experts import ExpertLinears
from llmq.grid import IntGrid
from llmq.methods.gptq import gptq_quantize
from llmq.methods.rtn import rtn_quantize
from llmq.pipeline import quantize_model
from llmq.source import ModelSource

# family -> (extra config, checkpoint names of an expert's gate / up / down projections)
FAMILIES = {
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2), ("w1", "w3", "w2")),
    "qwen3_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, decoder_sparse_step=1),
                  ("gate_proj", "up_proj", "down_proj")),
    # a dense first layer, then a MoE layer with a shared expert and its one-output gate
    "qwen2_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       decoder_sparse_step=2), ("gate_proj", "up_proj", "down_proj")),
    "olmoe": (dict(num_experts=4, num_experts_per_tok=2), ("gate_proj", "up_proj", "down_proj")),
    # dense first layer, shared experts, grouped routing; DeepSeek with multi-head latent attention
    "deepseek_v3": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                         first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                         v_head_dim=16, n_group=2, topk_group=1), ("gate_proj", "up_proj", "down_proj")),
    "glm4_moe": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                      first_k_dense_replace=1, head_dim=16), ("gate_proj", "up_proj", "down_proj")),
}
SEQ, N = 32, 4


def _save(family: str, path, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               **FAMILIES[family][0])
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (N, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_linears_compute_transformers_experts(tmp_path, family):
    src = _save(family, tmp_path / "src")
    ours, _ = load_model(str(src))
    assert any(isinstance(m, ExpertLinears) for m in ours.modules())
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, _hf(src)(_ids()).logits, rtol=1e-5, atol=1e-5)


def _gptq_v1_weight(t: dict[str, torch.Tensor], prefix: str, out: int) -> torch.Tensor:
    """Dequantize one linear of a 4-bit GPTQ v1 checkpoint from the published layout."""
    qw, qz, sc, gi = (t[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    inp = gi.numel()
    shifts = 4 * torch.arange(8)
    q = ((qw.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qw.shape[1])[:inp]  # (in, out)
    z = ((qz.to(torch.int64)[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(qz.shape[0], -1)[:, :out] + 1
    g = gi.long()
    return ((q - z[g]).float() * sc[g].float()).T


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_moe_gptq_checkpoint_decodes_to_the_transformers_model(tmp_path, family):
    src = _save(family, tmp_path / "src")
    cfg = build_config({}, {"method": "gptq", "bits": 4, "group_size": 32, "seqlen": SEQ, "nsamples": N, "dtype": "float32"})
    stats = quantize_model(ModelSource(str(src)), cfg, tmp_path / "q", progress=False, calib_ids=_ids(1))
    t = load_file(tmp_path / "q" / "model.safetensors")
    gate, up, down = FAMILIES[family][1]

    # Each expert was calibrated on the tokens routed to it: top-k slots per token, spread over experts.
    top_k = FAMILIES[family][0]["num_experts_per_tok"]  # (layer 1 is a MoE layer in every family here)
    routed = [r["tokens"] for r in stats.records if r["layer"] == 1 and r["module"].endswith(f".{gate}") and ".experts." in r["module"]]
    assert len(routed) == 4 and sum(routed) == top_k * N * SEQ and max(routed) < N * SEQ

    hf = _hf(src)
    source = load_file(src / "model.safetensors")
    seen = 0
    for key in [k for k in t if k.endswith(".qweight")]:
        prefix = key[: -len(".qweight")]
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)", prefix)
        if m is None:
            mod = hf.get_submodule(prefix)
            mod.weight.data.copy_(_gptq_v1_weight(t, prefix, mod.out_features))
            continue
        layer, e, proj = int(m[1]), int(m[2]), m[3]
        experts = hf.model.layers[layer].mlp.experts
        inter = experts.down_proj.shape[2]
        if proj == down:
            experts.down_proj.data[e] = _gptq_v1_weight(t, prefix, experts.down_proj.shape[1])
        else:
            rows = slice(0, inter) if proj == gate else slice(inter, 2 * inter)
            experts.gate_up_proj.data[e, rows] = _gptq_v1_weight(t, prefix, inter)
        seen += 1
    assert seen == 3 * 4 * (1 if family in ("qwen2_moe", "deepseek_v3") else 2)  # every expert projection of every MoE layer
    # routers and the shared expert's one-output gate stay float, unchanged
    for k in source:
        if k.endswith(("gate.weight", "shared_expert_gate.weight")) and ".experts." not in k and "gate_proj" not in k:
            assert torch.equal(t[k], source[k]), k
    q, _ = load_model(str(tmp_path / "q"))
    with torch.no_grad():
        torch.testing.assert_close(q(_ids()).logits, hf(_ids()).logits, rtol=1e-4, atol=1e-4)


def test_unrouted_expert_rounds_to_nearest():
    """An expert no calibration token reached has H = 0: GPTQ must not treat every column as dead
    (which would zero the matrix) but round to nearest."""
    W = torch.randn(16, 64)
    spec = IntGrid(bits=4, group_size=32)
    qt, info = gptq_quantize(W, torch.zeros(64, 64), spec)
    assert info.fallback_rtn
    assert torch.equal(qt.codes, rtn_quantize(W, spec).codes)
    assert qt.dequantize(torch.float32).abs().sum() > 0


def test_trace_calibrates_each_projection_role_of_all_experts_in_one_step(tmp_path):
    """The layer runs e0.gate/up, e0.down, e1.gate/up, ...; the steps are all experts' gate/up, then all
    downs (one forward each, not one per expert), including an expert the traced batch never reached."""
    src = _save("qwen3_moe", tmp_path / "src")
    model, _ = load_model(str(src))
    _, inputs = layer_inputs(model, _ids())
    layer = model.model.layers[0]

    def never_expert_3(_mod, args, kwargs):
        args = list(args)
        args[1] = torch.where(args[1] == 3, torch.zeros_like(args[1]), args[1])
        return tuple(args), kwargs

    h = layer.mlp.experts.register_forward_pre_hook(never_expert_3, with_kwargs=True)
    try:
        arch = trace_arch(Arch("model.layers", (layer_linears(layer),), discovered=True), layer, inputs.first_batch(), inputs.kwargs)
    finally:
        h.remove()
    steps = [sorted(s) for s in arch.sequential]
    experts = [f"mlp.experts.{e}." for e in range(4)]
    assert steps == [sorted(f"self_attn.{p}_proj" for p in "qkv"), ["self_attn.o_proj"],
                     sorted(e + p for e in experts for p in ("gate_proj", "up_proj")), sorted(e + "down_proj" for e in experts)]


def test_nonstandard_fused_experts_are_refused(tmp_path):
    """Fused experts in another layout (here: with biases) get a one-line refusal, not a wrong model."""
    src = _save("qwen3_moe", tmp_path / "src")
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    cls = modeling_qwen3_moe.Qwen3MoeExperts
    init = cls.__init__

    def with_bias(self, *a, **kw):
        init(self, *a, **kw)
        self.has_bias = True

    cls.__init__ = with_bias
    try:
        with pytest.raises(LlmqError, match="mixture-of-experts layers of model type 'qwen3_moe'"):
            ModelSource(str(src)).skeleton()
    finally:
        cls.__init__ = init


def test_moe_compressed_tensors_loads_in_transformers(tmp_path):
    """transformers + compressed-tensors read llmq's per-expert tensors into their fused experts."""
    pytest.importorskip("compressed_tensors")
    src = _save("qwen3_moe", tmp_path / "src")
    cfg = build_config({}, {"method": "gptq", "bits": 4, "group_size": 32, "seqlen": SEQ, "nsamples": N,
                            "format": "compressed-tensors", "dtype": "float32"})
    quantize_model(ModelSource(str(src)), cfg, tmp_path / "ct", progress=False, calib_ids=_ids(1))
    ours, _ = load_model(str(tmp_path / "ct"))
    theirs = _hf(tmp_path / "ct")
    with torch.no_grad():
        a, b, fp = ours(_ids()).logits, theirs(_ids()).logits, _hf(src)(_ids()).logits
    assert (a - fp).abs().max() > 1e-2  # 4-bit experts: far from the fp model ...
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # ... and theirs computes ours


def test_export_lists_the_same_float_linears_as_quantize(tmp_path):
    """`llmq export` to compressed-tensors names the linears it leaves in float as the quantize run does:
    by checkpoint key (Mixtral's router is block_sparse_moe.gate on disk, mlp.gate in transformers),
    routers included (transformers holds them as bare weights, not nn.Linear)."""
    import json

    pytest.importorskip("compressed_tensors")
    from llmq.export import export_checkpoint

    src = _save("mixtral", tmp_path / "src")
    cfg = build_config({}, {"method": "gptq", "bits": 4, "group_size": 32, "seqlen": SEQ, "nsamples": N,
                            "format": "compressed-tensors", "dtype": "float32"})
    quantize_model(ModelSource(str(src)), cfg, tmp_path / "ct", progress=False, calib_ids=_ids(1))
    export_checkpoint(str(tmp_path / "ct"), "compressed-tensors", tmp_path / "re")
    keys = set(load_file(src / "model.safetensors"))
    ignored = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]["ignore"] for d in ("ct", "re")]
    assert sorted(ignored[1]) == sorted(ignored[0])
    assert {"lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"} <= set(ignored[1])
    assert all(f"{n}.weight" in keys for n in ignored[1])  # checkpoint names, not module names


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "glm4_moe"])
def test_projection_counts_each_layers_own_linears(tmp_path, family):
    """Stacks that mix dense and MoE layers: the size projection (and the report, through the same
    decoder_linears) takes each layer's own linears, and its byte count is what quantize writes."""
    from llmq.arch import decoder_linears
    from llmq.projection import meta_model, project

    src = _save(family, tmp_path / "src")
    cfg = build_config({}, {"method": "rtn", "bits": 4, "group_size": 32})
    out = tmp_path / "q"
    quantize_model(ModelSource(str(src)), cfg, out, progress=False, calib_ids=_ids())
    packed = load_file(out / "model.safetensors")
    suffixes = ("qweight", "qzeros", "scales", "g_idx")
    written = sum(t.numel() * t.element_size() for k, t in packed.items() if k.rsplit(".", 1)[-1] in suffixes)
    model = meta_model(src / "config.json")
    linears = decoder_linears(model)
    assert any(".experts." in n for n in linears) and any(".mlp.gate_proj" in n for n in linears)  # dense and MoE layers
    assert project(model, cfg)["quantized_linears"] == written
