"""Bit allocation to a size budget: the knapsack against brute force, the size model against the files
written, and the allocation's worth measured with a plain forward of the fp32 model."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from conftest import C4, REF6M, STORIES, WIKI_TEST, need
from llmq.allocate import DP_STEPS, Candidate, Unit, solve
from llmq.checkpoint import load_for_eval, load_model
from llmq.data import eval_tokens
from llmq.errors import LlmqError
from llmq.eval import evaluate
from llmq.pipeline import quantize_model
from llmq.recipe import build_config, load_recipe, save_recipe
from llmq.source import ModelSource


def _units(rng: random.Random, n: int, k: int) -> list[Unit]:
    units = []
    for _ in range(n):
        sizes = sorted(rng.randrange(100, 5000) for _ in range(k))
        errs = sorted((rng.random() for _ in range(k)), reverse=True)  # more bytes, less error (mostly)
        if rng.random() < 0.3:
            rng.shuffle(errs)  # and some options that are simply worse
        units.append(Unit(("m",), 0, [Candidate(str(j), None, {}) for j in range(k)], sizes, errs))
    return units


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_fits_and_is_near_optimal(seed):
    """The answer fits; and it costs no more than the best answer of a budget smaller by the rounding the
    dynamic programme allows (one step of budget / DP_STEPS per unit)."""
    rng = random.Random(seed)
    units = _units(rng, 5, 4)
    lo = sum(min(u.bytes) for u in units)
    budget = rng.randrange(lo, sum(max(u.bytes) for u in units))
    choice = solve(units, budget)
    assert sum(u.bytes[c] for u, c in zip(units, choice)) <= budget
    slack = len(units) * -(-budget // DP_STEPS)

    def best(limit):
        return min((sum(u.error[c] for u, c in zip(units, cs)) for cs in itertools.product(range(4), repeat=len(units))
                    if sum(u.bytes[c] for u, c in zip(units, cs)) <= limit), default=float("inf"))

    assert sum(u.error[c] for u, c in zip(units, choice)) <= best(budget - slack) + 1e-12


def _size(path):
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))


FEW = {"allocate_bits": [2, 3, 4, 8], "allocate_group_sizes": [128], "allocate_gguf_types": ["Q2_K", "Q3_K", "Q4_K", "Q6_K"]}


def _run(tmp, name, model, **over):
    """A run on 16 windows of 128 tokens, choosing among fewer candidates than the default (test time)."""
    cfg = build_config({}, {"dataset": str(need(C4)), "nsamples": 16, "seqlen": 128, **FEW, **over})
    return quantize_model(ModelSource(str(need(model))), cfg, tmp / name, progress=False)


# (the default suite keeps one format; the other two take a minute and more)
@pytest.mark.parametrize("fmt", [pytest.param(None, marks=pytest.mark.slow), "compressed-tensors",
                                 pytest.param("gguf", marks=pytest.mark.slow)])
def test_allocation_fills_the_budget_and_never_exceeds_it(tmp_path, fmt):
    """At the size of a uniform file, the allocated file is within 1% of it and not over; GGUF sizes are
    planned to the byte."""
    base = {"method": "rtn", "bits": 3, "group_size": 128} if fmt != "gguf" else {"method": "rtn", "format": "gguf", "gguf_type": "Q3_K"}
    if fmt:
        base["format"] = fmt
    uniform = _run(tmp_path, "u" + (".gguf" if fmt == "gguf" else ""), REF6M, **base).output
    budget = _size(uniform)
    stats = _run(tmp_path, "a" + (".gguf" if fmt == "gguf" else ""), REF6M, **base, target_size=budget)
    size = _size(stats.output)
    assert 0.99 * budget <= size <= budget
    assert stats.allocation.total_bytes <= budget
    if fmt == "gguf":
        assert size == stats.allocation.total_bytes
    else:
        assert json.loads((stats.output / "llmq_provenance.json").read_text())["recipe"]["allocation"]["budget_bytes"] == budget


@pytest.mark.slow  # (a minute; eval/results/allocation-llmq-ref-6m.md measures the same on a real model)
def test_allocation_beats_the_uniform_recipe_of_its_size(tmp_path):
    """Measured by KL against the fp32 model on held-out text (plain forwards): allocated < uniform."""
    need(WIKI_TEST)
    uniform = _run(tmp_path, "u", REF6M, method="rtn", bits=3, group_size=128, rules=[r"^lm_head$=keep"]).output
    alloc = _run(tmp_path, "a", REF6M, method="rtn", bits=3, group_size=128, target_size=_size(uniform)).output
    reference, source = load_model(str(REF6M))
    tokens = eval_tokens(source.tokenizer(), str(WIKI_TEST))[: 40 * 256]
    kl = {}
    for name, path in (("uniform", uniform), ("alloc", alloc)):
        model, _, _ = load_for_eval(str(path))
        kl[name] = evaluate(model, tokens, 256, reference=reference, progress=False).kld
    assert kl["alloc"] < 0.8 * kl["uniform"], kl


def test_saved_recipe_reproduces_the_allocated_file(tmp_path):
    stats = _run(tmp_path, "a", STORIES, method="rtn", bits=4, group_size=32, target_bpw=14)
    save_recipe(tmp_path / "r.yaml", build_config({}, {"method": "rtn", "bits": 4, "group_size": 32, "target_bpw": 14,
                                                       "dataset": str(C4), "nsamples": 16, "seqlen": 128}),
                stats.allocation.rules())
    recipe = load_recipe(tmp_path / "r.yaml")
    assert "target_bpw" not in recipe and len(recipe["rules"]) == len(stats.allocation.units)
    again = quantize_model(ModelSource(str(STORIES)), build_config(recipe, {}), tmp_path / "b", progress=False).output
    assert (again / "model.safetensors").read_bytes() == (stats.output / "model.safetensors").read_bytes()


def test_impossible_budgets_and_formats_are_refused(tmp_path):
    with pytest.raises(LlmqError, match="below the smallest"):
        _run(tmp_path, "a", STORIES, method="rtn", target_bpw=2)
    for bad in ({"format": "awq", "target_bpw": 4}, {"target_bpw": 4, "target_size": "1MB"}, {"target_bpw": 0},
                {"method": "fp16", "target_bpw": 4}, {"target_bpw": 4, "allocate_bits": [5]}):
        with pytest.raises(LlmqError):
            build_config({}, {"method": "rtn", **bad})
    assert not (tmp_path / "a").exists()


def test_probe_errors_rank_units_as_their_end_to_end_kl(tmp_path):
    """The probe's price of each unit at 2 bits (logit lens through the head) ranks the units as their true
    end-to-end KL does, each unit quantized alone in the full fp32 model (Spearman rho >= 0.7)."""
    from llmq.allocate import CheckpointSizing, probe
    from llmq.arch import arch_for
    from llmq.data import calibration_tokens
    from llmq.grid import IntGrid
    from llmq.plan import resolve
    from llmq.rounding import rtn_quantize

    need(REF6M)
    source = ModelSource(str(REF6M))
    cfg = build_config({}, {"method": "rtn", "bits": 2, "target_bpw": 8, "allocate_bits": [2], "allocate_group_sizes": [128]})
    plan = resolve(cfg, source)
    skeleton = source.skeleton(torch.float32)
    units = [u for u in CheckpointSizing(source, plan, skeleton).units(arch_for(skeleton)) if u.layer is not None]
    ids = calibration_tokens(source.tokenizer(), str(need(C4)), 8, 128, 0, None)
    probe(source, plan, skeleton, arch_for(skeleton), plan.make_method(), ids, units, torch.device("cpu"), False)
    model, _ = load_model(str(REF6M))
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits.float(), -1)
    true = []
    for u in units:
        saved = {n: model.get_submodule(n).weight.data for n in u.modules}
        for n in u.modules:
            model.get_submodule(n).weight.data = rtn_quantize(saved[n], IntGrid(2, 128, True)).dequantize()
        with torch.no_grad():
            q = torch.log_softmax(model(ids).logits.float(), -1)
        true.append(float((ref.exp() * (ref - q)).sum(-1).mean()))
        for n in u.modules:
            model.get_submodule(n).weight.data = saved[n]
    predicted = [u.error[0] for u in units]
    rank = lambda xs: torch.tensor(xs).argsort().argsort().float()
    rho = torch.corrcoef(torch.stack([rank(predicted), rank(true)]))[0, 1]
    assert rho >= 0.7, (rho, predicted, true)
