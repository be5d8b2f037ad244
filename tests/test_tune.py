"""End-to-end tuning: the file keeps every zero, moves a code by at most one step (or none, asked to), stores
scales it can hold, and its KL from the unquantized model (a plain forward of both, on text it was not tuned
on) is lower than before tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import llmq.tune
from conftest import REF6M, STORIES, TINYSTORIES, need, save_tiny
from test_cli import assert_user_error, run
from llmq.checkpoint import iter_quantized, load_model, open_quantized
from llmq.cli import main
from llmq.config import CalibConfig
from llmq.data import eval_tokens
from llmq.errors import LlmqError
from llmq.grid import IntGrid
from llmq.methods.rtn import rtn_quantize
from llmq.pipeline import quantize_model
from llmq.provenance import PROVENANCE_FILE
from llmq.recipe import build_config
from llmq.source import ModelSource
from llmq.qtensor import QuantizedTensor
from llmq.tune import ScaledCodes, SignedSteps, TuneOptions, tune_checkpoint, weights_in_bf16

CALIB = CalibConfig(dataset=str(TINYSTORIES), nsamples=16, seqlen=128)


@pytest.fixture(scope="module")
def rtn_w3(tmp_path_factory):
    """stories260K, RTN W3 g32 asym (a large error for tuning to lower), as a gptq_v2 checkpoint."""
    need(STORIES), need(TINYSTORIES)
    out = tmp_path_factory.mktemp("tune") / "rtn-w3"
    cfg = build_config({}, {"method": "rtn", "bits": 3, "group_size": 32, "sym": False, "dtype": "float32",
                            "format": "gptq_v2"})
    quantize_model(ModelSource(str(STORIES)), cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def tuned(rtn_w3):
    out = rtn_w3.parent / "tuned"
    tune_checkpoint(str(rtn_w3), out, calib=CALIB, options=TuneOptions(steps=24, lr=5e-3, batch=4), progress=False)
    return out


def _packed(path) -> dict:
    source, qcfg = open_quantized(str(path))
    return dict(iter_quantized(source.skeleton(torch.float32), source, qcfg))


def _held_out_kl(path) -> float:
    """Mean KL(FP32 || model) over windows of the TinyStories text past the calibration's first tokens."""
    model, source = load_model(str(path))
    return _windows_kl(model, eval_tokens(source.tokenizer(), str(TINYSTORIES))[-8 * 128:].reshape(8, 128))


def _windows_kl(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean KL(FP32 stories260K || model) over windows ``ids``, by a plain float32 forward of both."""
    ref, _ = load_model(str(STORIES))
    with torch.no_grad():
        p = F.log_softmax(ref(input_ids=ids).logits, -1)
        q = F.log_softmax(model(input_ids=ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_scaled_codes_start_at_the_checkpoints_function():
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(24, 96, generator=g), torch.randn(5, 96, generator=g)
    qt = rtn_quantize(W, IntGrid(3, 32, False))
    bias = torch.randn(24, generator=g)
    assert torch.allclose(ScaledCodes(qt, bias)(x), F.linear(x, qt.dequantize(), bias), atol=1e-5)


def test_code_offsets_move_a_code_by_their_rounding_within_the_grid():
    """codes = clamp(q + round(v)); the weight is what the quantized tensor dequantizes to; d weight / d v is the
    column's scale where the code is inside the grid (rounding passed straight through), 0 where clamped."""
    g = torch.Generator().manual_seed(0)
    qt = rtn_quantize(torch.randn(16, 64, generator=g), IntGrid(3, 32, False))
    m = ScaledCodes(qt, None, codes=True)
    with torch.no_grad():
        m.v.copy_(torch.rand(m.v.shape, generator=g) * 2 - 1)
    wanted = (qt.codes.float() + m.v.detach().round()).clamp(0, 7)
    assert torch.equal(m.codes().float(), wanted) and (m.codes().float() - qt.codes.float()).abs().max() == 1
    w = m(torch.eye(64)).T  # (the linear's weight: its outputs on the unit vectors)
    stored = m.quantized()
    assert torch.allclose(w, QuantizedTensor(stored.codes, m.scales().detach(), qt.zeros, qt.g_idx, qt.grid).dequantize())
    up = torch.randn(w.shape, generator=g)
    (w * up).sum().backward()
    inside = (qt.codes.float() + m.v.detach().round()).eq(wanted)
    assert torch.allclose(m.v.grad, torch.where(inside, up * qt.scales[:, qt.g_idx.long()], 0))
    assert not inside.all()  # (some codes were clamped: the test saw both cases)
    # The scales' gradient, against autograd through a plain product with the moved codes held fixed.
    t = m.t.detach().clone().requires_grad_(True)
    s = (qt.scales * t.exp())[:, qt.g_idx.long()]
    (s * (wanted - qt.zeros[:, qt.g_idx.long()]) * up).sum().backward()
    assert torch.allclose(m.t.grad, t.grad, atol=1e-5)


def _permuted_rtn(g: torch.Generator) -> QuantizedTensor:
    """RTN W3 codes of a (24, 96) weight in groups of 32 whose columns are scattered (act-order's g_idx)."""
    qt = rtn_quantize(torch.randn(24, 96, generator=g), IntGrid(3, 32, False))
    perm = torch.randperm(96, generator=g)
    return QuantizedTensor(qt.codes[:, perm], qt.scales, qt.zeros, qt.g_idx[perm], qt.grid)


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_codes_linear_is_autograd_through_the_weight_without_keeping_it(permuted, bf16):
    """ScaledCodes' forward and gradients (input, offsets, log-scales) are those of a plain autograd
    linear through w = s·(q − z + v passed straight through round and clamp), under the same autocast; and
    where that keeps a weight-sized tensor for the backward, ScaledCodes keeps none."""
    g = torch.Generator().manual_seed(1)
    qt = _permuted_rtn(g) if permuted else rtn_quantize(torch.randn(24, 96, generator=g), IntGrid(3, 32, False))
    assert (qt.group_width == 0) == permuted
    bias = torch.randn(24, generator=g)
    m = ScaledCodes(qt, bias, codes=True)
    with torch.no_grad():
        m.v.copy_(torch.rand(m.v.shape, generator=g) * 2 - 1)
        m.t.copy_(torch.randn(m.t.shape, generator=g) * 0.1)
    v, t = m.v.detach().clone().requires_grad_(True), m.t.detach().clone().requires_grad_(True)
    x, up = torch.randn(3, 5, 96, generator=g), torch.randn(3, 5, 24, generator=g)
    col = qt.g_idx.long()
    moved = qt.codes.float() + v.detach().round()
    inside = moved.eq(moved.clamp(0, 7)).float()
    ste = v * inside + (moved.clamp(0, 7) - qt.codes.float() - v * inside).detach()  # (value: the shift)
    w = (qt.scales * t.exp())[:, col] * (qt.codes.float() + ste - qt.zeros.float()[:, col])

    def run(f, *leaves):
        xin = x.clone().requires_grad_(True)
        saved = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                torch.autograd.graph.saved_tensors_hooks(lambda a: saved.append(a) or a, lambda a: a):
            y = f(xin)
        (y.float() * up).sum().backward()
        return y, [xin.grad] + [p.grad for p in leaves], saved

    y, grads, saved = run(m, m.v, m.t)
    y_ref, grads_ref, saved_ref = run(lambda xin: F.linear(xin, w, bias), v, t)
    assert y.dtype == y_ref.dtype and torch.allclose(y.float(), y_ref.float(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):  # (the same products in the same dtype: equal but for summation order)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)

    def weight_sized(kept: list[torch.Tensor]) -> list[torch.Tensor]:  # (kept for the backward, not a parameter)
        own = {p.untyped_storage().data_ptr() for p in (m.v, m.t, v, t)}
        return [a for a in kept if a.numel() == w.numel() and a.untyped_storage().data_ptr() not in own]

    assert weight_sized(saved_ref) and not weight_sized(saved)


def test_signed_steps_move_by_the_sign_and_stay_within_one():
    p = torch.nn.Parameter(torch.tensor([0.0, 0.95, -0.3, 0.2]))
    p.grad = torch.tensor([2e-9, -5.0, 0.0, 3.0])
    SignedSteps([p], lr=0.1).step()
    assert torch.allclose(p.detach(), torch.tensor([-0.1, 1.0, -0.3, 0.1]))
    # In a backward, each offset steps as its gradient completes, and keeps no gradient.
    (p * torch.tensor([1.0, 1.0, -1.0, 0.0])).sum().backward()
    assert p.grad is None and torch.allclose(p.detach(), torch.tensor([-0.2, 0.9, -0.2, 0.1]))


def test_tuning_moves_codes_one_step_at_most_and_stores_fp16_scales(rtn_w3, tuned):
    before, after = _packed(rtn_w3), _packed(tuned)
    assert before.keys() == after.keys() and before
    moved = codes_moved = 0
    for name, qt in before.items():
        assert torch.equal(after[name].zeros, qt.zeros), name
        assert (after[name].codes.float() - qt.codes.float()).abs().max() <= 1, name
        assert torch.equal(after[name].scales, after[name].scales.half().float())
        assert torch.all(after[name].scales > 0)
        moved += int((after[name].scales != qt.scales).sum())
        codes_moved += int((after[name].codes != qt.codes).sum())
    assert moved > 0 and codes_moved > 0
    prov = json.loads((tuned / PROVENANCE_FILE).read_text())
    assert prov["recipe"]["tune"]["codes_moved"] == codes_moved and prov["recipe"]["tune"]["codes"] is True


def test_tuning_lowers_kl_on_text_it_did_not_see(rtn_w3, tuned):
    assert _held_out_kl(tuned) < 0.9 * _held_out_kl(rtn_w3)


def test_moving_codes_lowers_kl_below_tuning_scales_alone(rtn_w3, tuned, tmp_path):
    """The same tuning with every code kept leaves more KL on held-out text (measured: 0.29 against 0.24)."""
    options = TuneOptions(steps=24, lr=5e-3, batch=4, codes=False)
    tune_checkpoint(str(rtn_w3), tmp_path / "scales", calib=CALIB, options=options, progress=False)
    assert _held_out_kl(tuned) < 0.9 * _held_out_kl(tmp_path / "scales")


def test_provenance_names_the_source_model_and_the_tuning(tuned):
    prov = json.loads((tuned / PROVENANCE_FILE).read_text())
    assert prov["source"]["model"] == str(STORIES)
    assert prov["recipe"]["tune"]["steps"] == 24 and prov["recipe"]["quantized_with"]["method"] == "rtn"


def _stored(path) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint's safetensors files hold, by name."""
    return {k: t for f in sorted(Path(path).glob("*.safetensors")) for k, t in load_file(f).items()}


def test_a_tied_head_is_tuned_as_the_embedding_it_is(rtn_w3, tuned):
    """stories260K ties its head to the input embedding: the tuning moves that one stored tensor and the file
    stays tied (no lm_head tensor appears)."""
    before, after = _stored(rtn_w3), _stored(tuned)
    assert "lm_head.weight" not in after and after.keys() == before.keys()
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_a_tied_head_learns_from_its_head_role_alone(rtn_w3):
    """The tied tensor's lookup passes no gradient, its head product does."""
    s = llmq.tune.student(*open_quantized(str(rtn_w3)), norms=True, head=True)
    ids = torch.tensor([[1, 2, 3]])
    assert not s.model.get_input_embeddings()(ids).requires_grad
    (weight,) = s.head.values()
    s.model(input_ids=ids).logits.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_an_untied_head_is_tuned_and_the_input_embedding_kept(tmp_path):
    """llmq-ref-6m has its own head: it moves, the input embedding does not; with head=False neither does."""
    need(REF6M), need(TINYSTORIES)
    cfg = build_config({}, {"method": "rtn", "bits": 3, "group_size": 128, "dtype": "float32"})
    quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "rtn", progress=False)
    calib = CalibConfig(dataset=str(TINYSTORIES), nsamples=4, seqlen=64)
    for head in (True, False):
        tune_checkpoint(str(tmp_path / "rtn"), tmp_path / f"head-{head}", calib=calib,
                        options=TuneOptions(steps=3, lr=5e-3, batch=2, head=head), progress=False)
    src, on, off = _stored(REF6M), _stored(tmp_path / "head-True"), _stored(tmp_path / "head-False")
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(off[name], src[name]), name
    assert torch.equal(on["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    assert not torch.equal(on["lm_head.weight"], src["lm_head.weight"])
    assert json.loads((tmp_path / "head-False" / PROVENANCE_FILE).read_text())["recipe"]["tune"]["head"] is False


def test_refuses_a_reference_of_another_shape(rtn_w3, tmp_path):
    need(REF6M)
    with pytest.raises(LlmqError, match="does not match"):
        tune_checkpoint(str(rtn_w3), tmp_path / "o", reference=str(REF6M), calib=CALIB, progress=False)
    assert not (tmp_path / "o").exists()


def test_refuses_a_plain_model_and_bad_options(rtn_w3, tmp_path):
    with pytest.raises(LlmqError, match="not a quantized checkpoint"):
        tune_checkpoint(str(STORIES), tmp_path / "o", calib=CALIB, progress=False)
    with pytest.raises(LlmqError, match="steps must be positive"):
        tune_checkpoint(str(rtn_w3), tmp_path / "o", calib=CALIB, options=TuneOptions(steps=0), progress=False)
    with pytest.raises(LlmqError, match="compute dtype must be"):
        tune_checkpoint(str(rtn_w3), tmp_path / "o", calib=CALIB, options=TuneOptions(compute_dtype="fp8"),
                        progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_says_one_line_for_a_float_model(tmp_path):
    need(STORIES)
    p = run("tune", "--model", str(STORIES), "--dataset", str(TINYSTORIES), "--out", str(tmp_path / "o"))
    assert_user_error(p, "not a quantized checkpoint")
    assert not (tmp_path / "o").exists()


def test_quantize_with_tune_steps_keeps_the_layerwise_codes(tmp_path):
    """A recipe with tune_steps writes the codes the same recipe writes without it (the same calibration
    windows reach both stages), with tuned scales, and leaves no staging directory behind."""
    need(STORIES), need(TINYSTORIES)
    args = ("quantize", "--model", str(STORIES), "--method", "gptq", "--bits", "3", "--group-size", "32",
            "--dataset", str(TINYSTORIES), "--nsamples", "8", "--seqlen", "128", "--quiet")
    p = run(*args, "--out", str(tmp_path / "plain"))
    assert p.returncode == 0, p.stderr
    p = run(*args, "--tune-steps", "6", "--tune-lr", "0.005", "--tune-batch", "3", "--no-tune-head", "--no-tune-codes",
            "--tune-recompute", "--tune-sampled", "2", "--out", str(tmp_path / "tuned"))
    assert p.returncode == 0, p.stderr
    assert "scales tuned end to end (6 steps)" in p.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plain", "tuned"]
    plain, tuned = _packed(tmp_path / "plain"), _packed(tmp_path / "tuned")
    assert all(torch.equal(plain[n].codes, tuned[n].codes) for n in plain)
    assert any(not torch.equal(plain[n].scales, tuned[n].scales) for n in plain)
    recipe = json.loads((tmp_path / "tuned" / PROVENANCE_FILE).read_text())["recipe"]
    assert recipe["tune"]["steps"] == 6 and recipe["tune"]["batch"] == 3 and recipe["tune"]["nsamples"] == 8
    assert recipe["tune"]["sampled"] == 2
    assert recipe["tune"]["head"] is False  # (--no-tune-head: the tied embedding as GPTQ's file has it)
    assert recipe["tune"]["codes"] is False and recipe["tune"]["codes_moved"] == 0 and recipe["tune"]["recompute"] is True
    head = "model.embed_tokens.weight"
    assert torch.equal(_stored(tmp_path / "tuned")[head], _stored(tmp_path / "plain")[head])
    assert recipe["quantized_with"]["method"] == "gptq" and "untuned" not in json.dumps(recipe)  # (no staging path)


def _failing_tuning(failure: Exception):
    def tune(*args, **kwargs):
        raise failure
    return tune


def test_a_tuning_out_of_memory_keeps_the_quantization_and_says_so(tmp_path, monkeypatch, capsys):
    """A recipe whose tuning runs out of memory (here: the allocation torch.empty really fails) exits in one
    line naming the finished quantization, kept as OUT.untuned: the same files as the recipe without tuning.
    Kept once only: with OUT.untuned taken the next failure says so and leaves nothing behind."""
    need(STORIES), need(TINYSTORIES)
    args = ["quantize", "--model", str(STORIES), "--method", "gptq", "--bits", "3", "--group-size", "32",
            "--dataset", str(TINYSTORIES), "--nsamples", "8", "--seqlen", "128", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    try:
        torch.empty(2**50, dtype=torch.uint8)  # (1 PiB: the CPU allocator's own failure)
    except RuntimeError as e:
        monkeypatch.setattr(llmq.tune, "tune", _failing_tuning(e))
    capsys.readouterr()
    assert main([*args, "--tune-steps", "4", "--tune-lr", "0.004", "--tune-batch", "3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llmq: error: tuning failed: out of memory (an allocation of")
    assert str(tmp_path / "o.untuned") in err and "llmq tune --model" in err and "--steps 4 --lr 0.004 --batch 3 --recompute --out" in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["o.untuned", "plain"]
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "o.untuned" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    assert main([*args, "--tune-steps", "4", "--out", str(tmp_path / "o")]) == 2
    assert "o.untuned exists, so the quantization was not kept" in capsys.readouterr().err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["o.untuned", "plain"]


def test_a_tuning_that_fails_otherwise_keeps_its_traceback_and_the_quantization(tmp_path, monkeypatch):
    need(STORIES), need(TINYSTORIES)
    monkeypatch.setattr(llmq.tune, "tune", _failing_tuning(ValueError("a bug")))
    args = ["quantize", "--model", str(STORIES), "--method", "rtn", "--dataset", str(TINYSTORIES), "--nsamples", "4",
            "--seqlen", "64", "--quiet", "--tune-steps", "4", "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="a bug") as failure:
        main(args)
    assert any("o.untuned" in note for note in failure.value.__notes__)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["o.untuned"]


@pytest.mark.parametrize("extra,needle", [(("--format", "gguf", "--gguf-type", "q4_k"), "tune_steps tunes integer-grid"),
                                          (("--resume",), "--resume does not continue"),
                                          (("--tune-batch", "0"), "tune_batch must be a whole number > 0")])
def test_quantize_refuses_tuning_it_cannot_do(tmp_path, extra, needle):
    need(STORIES)
    p = run("quantize", "--model", str(STORIES), "--method", "rtn", "--tune-steps", "4", *extra,
            "--out", str(tmp_path / "o"))
    assert_user_error(p, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key", ["tune_head", "tune_codes"])
def test_a_recipe_says_tune_head_and_codes_as_true_or_false(key):
    assert getattr(build_config({key: False}, {}), key) is False
    with pytest.raises(LlmqError, match=f"{key} must be true or false, got 'yes'"):
        build_config({key: "yes"}, {})


def test_a_method_without_calibration_is_tuned_on_the_recipes_windows(tmp_path):
    """RTN needs no calibration, but its tuning does: the recipe's windows are drawn for it."""
    need(STORIES), need(TINYSTORIES)
    p = run("quantize", "--model", str(STORIES), "--method", "rtn", "--bits", "3", "--group-size", "32",
            "--dataset", str(TINYSTORIES), "--nsamples", "4", "--seqlen", "64", "--tune-steps", "2", "--quiet",
            "--out", str(tmp_path / "o"))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "o" / PROVENANCE_FILE).read_text())["recipe"]["tune"]["nsamples"] == 4


def test_cached_teacher_logits_tune_as_the_per_step_teacher(rtn_w3, tmp_path, monkeypatch):
    """The teacher's logits kept from one pass give the scales that computing them every step gives."""
    options = TuneOptions(steps=6, lr=5e-3, batch=4, codes=False, compute_dtype="float32")
    tune_checkpoint(str(rtn_w3), tmp_path / "cached", calib=CALIB, options=options, progress=False)
    monkeypatch.setattr(llmq.tune, "TEACHER_CACHE_BYTES", 0)
    tune_checkpoint(str(rtn_w3), tmp_path / "per-step", calib=CALIB, options=options, progress=False)
    a, b = _packed(tmp_path / "cached"), _packed(tmp_path / "per-step")
    assert any(not torch.equal(a[n].scales, q.scales) for n, q in _packed(rtn_w3).items())  # (it did tune)
    for n in a:
        torch.testing.assert_close(a[n].scales, b[n].scales, rtol=2e-3, atol=0)


def test_a_teacher_with_bf16_linears_has_the_float32_ones_logits_in_bf16_products():
    """weights_in_bf16 stores what bf16 autocast rounds each product's weight to anyway: the same logits, bit
    for bit; the head tied to the embedding is cut loose, the embedding keeping its float32 weight."""
    need(STORIES)
    model, _ = load_model(str(STORIES))
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding  # (stories260K ties them)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.randint(0, embedding.shape[0], (2, 64), generator=torch.Generator().manual_seed(0))

    def logits() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids).logits

    want, kept = logits(), embedding.detach().clone()
    weights_in_bf16(model, names)
    assert {model.get_submodule(n).weight.dtype for n in names} == {torch.bfloat16} and "lm_head" in names
    assert model.get_input_embeddings().weight.dtype == torch.float32 and torch.equal(model.get_input_embeddings().weight, kept)
    assert torch.equal(logits(), want)


def test_recompute_keeps_a_fraction_for_the_backward_and_tunes_byte_for_byte_the_same(rtn_w3, tmp_path):
    """--recompute: what one forward keeps for the backward (outside the decoder layers, which keep their
    inputs alone) is under a third of a plain forward's; the tuned file is the same, byte for byte."""
    kept = {}
    for recompute in (False, True):
        options = TuneOptions(steps=6, lr=5e-3, batch=4, recompute=recompute)
        tune_checkpoint(str(rtn_w3), tmp_path / str(recompute), calib=CALIB, options=options, progress=False)
        source, qcfg = open_quantized(str(rtn_w3))
        s = llmq.tune.student(source, qcfg, True, True, True)
        if recompute:
            llmq.tune.recompute_layers(s.model, "model.layers")
        sizes = []
        ids = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(lambda a: sizes.append(a.numel() * a.element_size()) or a, lambda a: a):
            s.model(input_ids=ids, use_cache=False).logits.float().pow(2).mean().backward()
        kept[recompute] = sum(sizes)
    assert kept[True] < kept[False] / 3
    assert (tmp_path / "True" / "model.safetensors").read_bytes() == (tmp_path / "False" / "model.safetensors").read_bytes()


def test_an_untied_head_is_stored_in_bf16_with_the_same_logits_and_a_tied_one_is_left():
    need(REF6M), need(STORIES)
    assert llmq.tune._untied_head(load_model(str(STORIES))[0]) == []  # (tied to the embedding)
    model, _ = load_model(str(REF6M))
    assert llmq.tune._untied_head(model) == ["lm_head"]
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
        weights_in_bf16(model, ["lm_head"])
        assert model.lm_head.weight.dtype == torch.bfloat16 and torch.equal(model(input_ids=ids).logits, want)


def test_recompute_on_a_mixture_of_experts_tunes_as_without(tmp_path):
    """The student's packed linears are not nn.Linear, so the layers to recompute are found on the teacher:
    a mixture of experts (mixtral, whose layers the table cannot confirm on the student) tunes byte for byte as
    without recompute."""
    src = save_tiny("mixtral", tmp_path / "src")
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = build_config({}, {"method": "rtn", "bits": 4, "group_size": 32, "dtype": "float32"})
    quantize_model(ModelSource(str(src)), cfg, tmp_path / "q", progress=False)
    for recompute in (False, True):
        options = TuneOptions(steps=3, batch=4, recompute=recompute)
        tune_checkpoint(str(tmp_path / "q"), tmp_path / str(recompute), ids=ids, options=options, progress=False)
    assert (tmp_path / "True" / "model.safetensors").read_bytes() == (tmp_path / "False" / "model.safetensors").read_bytes()


def test_signed_steps_held_add_up_the_parts_and_step_once_on_their_sum():
    p = torch.nn.Parameter(torch.tensor([0.0, 0.0, 0.5]))
    steps = SignedSteps([p], lr=0.1)
    steps.hold = True
    (p * torch.tensor([1.0, -2.0, 0.0])).sum().backward()
    (p * torch.tensor([-3.0, 1.0, 1.0])).sum().backward()
    assert torch.equal(p.detach(), torch.tensor([0.0, 0.0, 0.5])) and torch.equal(p.grad, torch.tensor([-2.0, -1.0, 1.0]))
    steps.hold = False
    (p * torch.tensor([0.0, 0.0, -2.0])).sum().backward()  # (the sum: -2, -1, -1)
    assert p.grad is None and torch.allclose(p.detach(), torch.tensor([0.1, 0.1, 0.6]))


def test_a_batch_in_parts_tunes_as_the_whole_batch(rtn_w3, tmp_path, monkeypatch):
    """Windows through one at a time, their gradients summed (a large vocabulary's batch), give the scales and
    moved codes of the whole batch at once; stepping the codes on each part instead would move many more."""
    options = TuneOptions(steps=24, lr=5e-3, batch=4, codes=True, compute_dtype="float32")
    assert llmq.tune.windows_per_pass(load_model(str(STORIES))[0], CALIB.seqlen, 4) == 4
    tune_checkpoint(str(rtn_w3), tmp_path / "whole", calib=CALIB, options=options, progress=False)
    monkeypatch.setattr(llmq.tune, "PASS_LOGITS_BYTES", 0)
    tune_checkpoint(str(rtn_w3), tmp_path / "parts", calib=CALIB, options=options, progress=False)
    start, a, b = _packed(rtn_w3), _packed(tmp_path / "whole"), _packed(tmp_path / "parts")
    moved = sum(int((a[n].codes != q.codes).sum()) for n, q in start.items())
    differ = sum(int((a[n].codes != b[n].codes).sum()) for n in a)
    assert moved > 0 and differ <= moved // 20
    for n in a:
        torch.testing.assert_close(a[n].scales, b[n].scales, rtol=2e-3, atol=0)


def test_tuning_keeps_a_full_range_grids_signed_scales(tmp_path):
    """A full-range grid's negative scales stay negative through the tuning (s0·exp(t), stored with its
    sign), and the tuning still lowers the held-out KL."""
    need(STORIES), need(TINYSTORIES)
    src, out = tmp_path / "full-range", tmp_path / "tuned"
    cfg = build_config({}, {"method": "rtn", "bits": 3, "group_size": 32, "full_range": True, "dtype": "float32"})
    quantize_model(ModelSource(str(STORIES)), cfg, src, progress=False)
    tune_checkpoint(str(src), out, calib=CALIB, options=TuneOptions(steps=16, lr=5e-3, batch=4), progress=False)
    before, after = _packed(src), _packed(out)
    assert sum(int((qt.scales < 0).sum()) for qt in before.values()) > 0
    for name, qt in before.items():
        assert torch.equal(after[name].scales.sign(), qt.scales.sign()), name
    assert any(not torch.equal(after[n].scales, qt.scales) for n, qt in before.items())
    assert _held_out_kl(out) < 0.95 * _held_out_kl(src)


def _check_setup(rtn_w3):
    """The RTN checkpoint as a student learning codes, the teacher, and a CodeCheck on 4 windows every 5 steps
    from the 10th."""
    source, qcfg = open_quantized(str(rtn_w3))
    s = llmq.tune.student(source, qcfg, norms=True, codes=True)
    teacher, _ = load_model(str(STORIES))
    ids = eval_tokens(source.tokenizer(), str(TINYSTORIES))[-4 * 128:].reshape(4, 128)
    return s, teacher, llmq.tune.CodeCheck(ids, None, every=5, first=10, per_pass=2, bf16=False)


def test_code_check_undoes_moves_that_raise_the_held_out_kl(rtn_w3):
    """Codes moved at random (a third of them) raise the KL: the check undoes every move, and the KL it
    reports without them is the checkpoint's own, from a plain forward of the file as loaded."""
    s, teacher, check = _check_setup(rtn_w3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in s.linears.values():
            m.v.copy_(torch.randint(-1, 2, m.v.shape, generator=g) * (torch.rand(m.v.shape, generator=g) < 0.33))
    for step in (5, 12):  # (before the first check, and not a check step: nothing looked at)
        assert check.undoes(s, teacher, step=step) is None
    assert all(m.v is not None for m in s.linears.values())
    undone = check.undoes(s, teacher, step=15)
    assert undone is not None and undone["step"] == 15
    assert all(m.v is None for m in s.linears.values()) and s.code_offsets() == []
    plain, _ = load_model(str(rtn_w3))
    assert undone["held_out_kl_undone"] == pytest.approx(_windows_kl(plain, check.ids), rel=1e-4)
    assert undone["held_out_kl_moved"] > undone["held_out_kl_undone"]


def test_code_check_keeps_moves_that_lower_the_held_out_kl(rtn_w3):
    """Every code put one step off RTN's (where the grid allows) with offsets that move it back: the moves
    restore round-to-nearest, so the check keeps them, the same offsets, and the student is RTN's file."""
    s, teacher, check = _check_setup(rtn_w3)
    with torch.no_grad():
        for m in s.linears.values():
            up = m.q < m.qt.grid.maxq
            m.q += up
            m.v.copy_(-up.float())
    offsets = {n: m.v for n, m in s.linears.items()}
    assert check.undoes(s, teacher, step=10) is None
    assert all(m.v is offsets[n] for n, m in s.linears.items())
    plain, _ = load_model(str(rtn_w3))
    assert float(check.kl(s, teacher).mean()) == pytest.approx(_windows_kl(plain, check.ids), rel=1e-4)


def test_a_tuning_whose_code_moves_hurt_keeps_the_checkpoints_codes(rtn_w3, tmp_path, monkeypatch):
    """Offsets stepped far enough that noise moves most codes (CODE_SPREAD 20x): the check undoes the moves, so
    the file has every code of the checkpoint, tuned scales, and says where; `--no-codes-check`: codes moved."""
    monkeypatch.setattr(llmq.tune, "CODE_SPREAD", 20 * llmq.tune.CODE_SPREAD)
    calib = CalibConfig(dataset=str(TINYSTORIES), nsamples=64, seqlen=128)  # (8 held out: MIN_HELD_OUT)
    options = TuneOptions(steps=8, lr=5e-3, batch=4, compute_dtype="float32")
    _, r = tune_checkpoint(str(rtn_w3), tmp_path / "checked", calib=calib, options=options, progress=False)
    before, after = _packed(rtn_w3), _packed(tmp_path / "checked")
    assert all(torch.equal(after[n].codes, q.codes) for n, q in before.items())
    assert any(not torch.equal(after[n].scales, q.scales) for n, q in before.items())
    prov = json.loads((tmp_path / "checked" / PROVENANCE_FILE).read_text())["recipe"]["tune"]
    assert prov["codes_undone"] == r.codes_undone and r.codes_undone["step"] in (4, 6, 8) and r.codes_moved == 0
    assert main(["tune", "--model", str(rtn_w3), "--dataset", str(TINYSTORIES), "--nsamples", "64", "--seqlen", "128",
                 "--steps", "8", "--lr", "5e-3", "--batch", "4", "--compute-dtype", "float32", "--no-codes-check",
                 "--out", str(tmp_path / "unchecked"), "--quiet"]) == 0
    prov = json.loads((tmp_path / "unchecked" / PROVENANCE_FILE).read_text())["recipe"]["tune"]
    assert prov["check_codes"] is False and prov["codes_undone"] is None and prov["codes_moved"] > 0
