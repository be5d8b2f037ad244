"""scripts/bench_accuracy.py end to end on a tiny model (llmq's recipes only: the peers live in their own
virtualenvs), so the script that makes the accuracy tables cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, STORIES, TINYSTORIES, need


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
