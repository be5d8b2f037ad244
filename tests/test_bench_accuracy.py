"""scripts/bench_accuracy.py end to end on a tiny model (llmq's recipes only: the peers live in their own
virtualenvs), so the script that makes the accuracy tables cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, STORIES, TINYSTORIES, need

_spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "scripts" / "bench_accuracy.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_float_linears_are_the_decoder_linears_an_output_keeps_unquantized(tmp_path):
    """A source with two decoder linears, a norm, embeddings and a head; an output that packs one linear
    (GPTQ's qweight) and keeps the other: only the kept linear is a float linear.  Compressed-tensors'
    weight_packed counts as quantized, as does any name without a float .weight."""
    src, gptq, ct = tmp_path / "src", tmp_path / "gptq", tmp_path / "ct"
    for d in (src, gptq, ct):
        d.mkdir()
    def save(folder, names, file="model.safetensors"):  # (2-D or 1-D as the name says; each its own tensor)
        save_file({n: torch.zeros(8) if "norm" in n or "scales" in n else torch.zeros(8, 8) for n in names},
                  str(folder / file))

    head = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"]
    save(src, head + ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"])
    save(gptq, head + ["model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.q_proj.scales",
                       "model.layers.0.mlp.up_proj.weight"], "model-00001-of-00001.safetensors")
    save(ct, ["model.layers.0.self_attn.q_proj.weight_packed", "model.layers.0.mlp.up_proj.weight_packed"])
    assert bench.float_linears(src, gptq) == ["model.layers.0.mlp.up_proj"]
    assert bench.float_linears(src, ct) == []
    assert bench.float_linears(src, src) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]


def test_float_linears_of_a_real_export_with_skipped_mlps(tmp_path):
    """llmq's own GPTQ file of stories260K with every MLP left in float, read as a peer's output would be:
    the float linears are exactly the MLP projections of every layer the model's config counts."""
    need(STORIES)
    out = tmp_path / "q"
    p = subprocess.run([sys.executable, "-m", "llmq", "quantize", "--model", str(STORIES), "--method", "rtn",
                        "--bits", "4", "--group-size", "32", "--skip", "lm_head", "--skip", "mlp.*", "--out", str(out),
                        "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    layers = json.loads((STORIES / "config.json").read_text())["num_hidden_layers"]
    assert bench.float_linears(STORIES, out) == sorted(f"model.layers.{i}.mlp.{n}" for i in range(layers)
                                                        for n in ("down_proj", "gate_proj", "up_proj"))


@pytest.mark.slow
def test_bench_accuracy_writes_one_row_per_recipe_and_setting(tmp_path):
    need(STORIES)
    text = str(need(TINYSTORIES))
    out = tmp_path / "acc"
    p = subprocess.run([sys.executable, "scripts/bench_accuracy.py", "--model", str(STORIES), "--calib-dataset", text,
                        "--eval-dataset", text, "--nsamples", "4", "--seqlen", "128", "--max-windows", "4",
                        "--settings", "w4g32,w2g32", "--recipes", "gptq,gptq-mm,best,learned", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    recipes = ("gptq", "gptq-mm", "best", "learned")
    assert [(r["setting"], r["recipe"]) for r in rows] == [(s, r) for s in ("W4 g32", "W2 g32") for r in recipes]
    assert all(math.isfinite(r["kld"]) and r["kld"] > 0 and 0 < r["top1"] <= 1 for r in rows)
    kl = {(r["setting"], r["recipe"]): r["kld"] for r in rows}
    assert kl[("W2 g32", "gptq")] > kl[("W4 g32", "gptq")]  # two bits cost more than four
    assert "| W2 g32 | llmq | gptq-mm |" in out.with_suffix(".md").read_text()


def test_rows_at_a_peers_layout_take_that_peers_kl_as_their_reference():
    """Other rows divide by the best peer's KL; a row at one peer's layout by that peer's, the one model of
    the same bytes, even where another peer's KL is lower."""
    def row(tool, recipe, kld, **extra):
        return {"setting": "W4 g32", "tool": tool, "recipe": recipe, "kld": kld, "top1": 0.9, "ppl": 5.0,
                "seconds": 1.0, "weights_mib": 0.5, **extra}

    rows = [row("llmq", "best", 0.02), row("autoround", "default", 0.01), row("gptqmodel", "default", 0.005),
            row("llmq", "best, autoround's layout", 0.008, layout_of="autoround", float_linears=15)]
    cells = [line.strip("| ").split(" | ") for line in bench.table(rows)[2:]]
    assert {(c[1], c[2]): c[-1] for c in cells} == {("llmq", "best"): "4.00×", ("autoround", "default"): "2.00×",
                                                    ("gptqmodel", "default"): "1.00×",
                                                    ("llmq", "best, autoround's layout"): "0.80×"}
    assert "autoround 15" in " ".join(bench.layout_note(rows))


def test_a_peer_keeping_linears_in_float_gets_llmq_rows_at_its_layout(tmp_path, monkeypatch):
    """The orchestration, with the runs and evals stubbed: a peer whose output keeps one decoder linear in
    float is followed by each layout recipe run with exactly that linear skipped; a peer that quantized
    them all gets none."""
    src = tmp_path / "src"
    src.mkdir()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    save_file({f"{n}.weight": torch.zeros(8, 8) for n in names}, str(src / "model.safetensors"))
    calls = []

    def run(tool, recipe, python, model, out, ids, bits, gs, skip=()):
        calls.append((tool, recipe, list(skip)))
        out.mkdir()
        keep = names[1:] if tool == "autoround" else []  # (AutoRound keeps up_proj in float)
        save_file({**{f"{n}.qweight": torch.zeros(1, 8, dtype=torch.int32) for n in names if n not in keep},
                   **{f"{n}.weight": torch.zeros(8, 8) for n in keep}}, str(out / "model.safetensors"))
        return {"seconds": 1.0, "versions": {}}

    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(bench, "evaluate", lambda out, model, args: {"kld": 0.1, "top1": 0.9, "ppl": 5.0})
    args = type("Args", (), {"model": str(src)})()
    rows, _ = bench.bench_setting(4, 32, ["gptq"], ["best", "learned"], {"gptqmodel": "py", "autoround": "py"},
                                  tmp_path, tmp_path / "ids.pt", args)
    assert calls == [("llmq", "gptq", []), ("gptqmodel", "default", []), ("autoround", "default", []),
                     ("llmq", "best", names[1:]), ("llmq", "learned", names[1:])]
    assert [(r["recipe"], r.get("layout_of"), r.get("float_linears")) for r in rows][-2:] == \
        [("best, autoround's layout", "autoround", 1), ("learned, autoround's layout", "autoround", 1)]
