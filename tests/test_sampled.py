"""Windows the unquantized model writes itself: each token drawn from the model's own distribution given the
ones before (checked against a plain loop that runs the whole prefix through the model at every token), and
a tuning that fits them carries better to the model's text than one fitting off-domain calibration alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmq.sampled
import llmq.tune
from conftest import C4, STORIES, TINYSTORIES, need, tiny_config
from test_cli import assert_user_error, run
from test_tune import _held_out_kl, rtn_w3  # noqa: F401 (a fixture)
from llmq.config import CalibConfig
from llmq.errors import LlmqError
from llmq.provenance import PROVENANCE_FILE
from llmq.recipe import build_config
from llmq.sampled import sampled_windows, start_tokens, windows_at_once
from llmq.tune import TuneOptions, tune_checkpoint


def _tiny(model_type: str, bos: int | None = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny_config(model_type, vocab=64)
    cfg.bos_token_id = bos
    return AutoModelForCausalLM.from_config(cfg).eval()


def _plain_draws(model: torch.nn.Module, first: torch.Tensor, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    """The same draws without a cache: the whole prefix through the model for every next token."""
    ids = first[:, None]
    with torch.no_grad():
        for _ in range(seqlen - 1):
            probs = model(input_ids=ids, use_cache=False).logits[:, -1].float().softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    return ids


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "gpt2"])
def test_each_token_is_drawn_from_the_model_given_the_ones_before(model_type):
    model = _tiny(model_type)
    calib = torch.randint(3, 64, (4, 24))
    got = sampled_windows(model, 6, 24, calib, seed=5, progress=False)
    want = _plain_draws(model, torch.full((6,), 1), 24, torch.Generator().manual_seed(5))
    assert torch.equal(got, want)
    assert len(set(map(tuple, got.tolist()))) == 6  # (six different windows, not one repeated)


def test_windows_beyond_the_cache_budget_are_drawn_in_turn(monkeypatch):
    model = _tiny("llama")
    monkeypatch.setattr(llmq.sampled, "CACHE_BYTES", 2 * _window_cache(model, 16))
    assert windows_at_once(model, 16, llmq.sampled.CACHE_BYTES, 4) == 2
    assert windows_at_once(model, 16, llmq.sampled.CACHE_BYTES, 2) == 4  # (a bf16 cache: twice the windows)
    got = sampled_windows(model, 5, 16, torch.zeros(1, 16, dtype=torch.long), seed=3, progress=False)
    gen = torch.Generator().manual_seed(3)
    want = torch.cat([_plain_draws(model, torch.full((n,), 1), 16, gen) for n in (2, 2, 1)])
    assert torch.equal(got, want)


def _window_cache(model: torch.nn.Module, seqlen: int) -> int:
    """One window's float32 KV cache, from the config: keys and values of every layer's KV heads."""
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * seqlen * 4


def test_a_model_without_bos_starts_from_the_calibration_windows_first_tokens():
    model = _tiny("llama", bos=None)
    calib = torch.tensor([[7, 1, 1], [9, 1, 1]])
    assert start_tokens(model, calib, 5).tolist() == [7, 9, 7, 9, 7]
    assert sampled_windows(model, 3, 8, calib, seed=0, progress=False)[:, 0].tolist() == [7, 9, 7]


def test_the_tuning_fits_the_calibration_windows_and_the_sampled_ones(rtn_w3, tmp_path, monkeypatch):  # noqa: F811
    seen = []
    backward = llmq.tune._backward
    monkeypatch.setattr(llmq.tune, "_backward", lambda s, t, ids, *a: seen.append(ids) or backward(s, t, ids, *a))
    calib = CalibConfig(dataset=str(TINYSTORIES), nsamples=4, seqlen=64)
    options = TuneOptions(steps=2, batch=4, sampled=3, compute_dtype="float32")
    tune_checkpoint(str(rtn_w3), tmp_path / "o", calib=calib, options=options, progress=False)
    teacher = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    drawn = sampled_windows(teacher, 3, 64, seen[0][:4], seed=options.seed, progress=False)
    assert seen[0].shape == (7, 64) and torch.equal(seen[0][4:], drawn)
    tune = json.loads((tmp_path / "o" / PROVENANCE_FILE).read_text())["recipe"]["tune"]
    assert (tune["sampled"], tune["nsamples"]) == (3, 4)


def test_sampled_windows_carry_an_off_domain_tuning_to_the_models_text(rtn_w3, tmp_path):  # noqa: F811
    """Tuned on C4 alone, a model of children's stories fits C4; with its own windows too, its stories:
    the KL on TinyStories text (a plain float32 forward of both models) is lower."""
    need(C4)
    calib = CalibConfig(dataset=str(C4), nsamples=8, seqlen=128)
    kl = {}
    for n in (0, 16):
        options = TuneOptions(steps=24, lr=5e-3, batch=4, sampled=n, compute_dtype="float32")
        tune_checkpoint(str(rtn_w3), tmp_path / str(n), calib=calib, options=options, progress=False)
        kl[n] = _held_out_kl(tmp_path / str(n))
    assert kl[16] < 0.8 * kl[0], kl


def test_refuses_a_negative_count(rtn_w3, tmp_path):  # noqa: F811
    p = run("tune", "--model", str(rtn_w3), "--dataset", str(TINYSTORIES), "--sampled", "-1",
            "--out", str(tmp_path / "o"))
    assert_user_error(p, "sampled windows must be 0 or more, got -1")
    with pytest.raises(LlmqError, match="tune_sampled must be a whole number >= 0, got -2"):
        build_config({"tune_sampled": -2}, {})
    assert not (tmp_path / "o").exists()
