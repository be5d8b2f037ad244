"""User mistakes: one line on stderr, non-zero exit, no traceback, no output directory left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, STORIES, TINYSTORIES, need


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmq", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_user_error(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmq: error:"), p.stderr
    assert needle in lines[0], lines[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


@pytest.fixture
def bert_dir(tmp_path):
    from transformers import BertConfig

    d = tmp_path / "bert"
    # as every real BERT checkpoint does, the config names its architecture
    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(d)
    return d


def test_missing_model(tmp_path):
    p = run("quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_user_error(p, "does not exist")
    assert leftovers(tmp_path) == []


def test_not_a_causal_lm(tmp_path, bert_dir):
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(1)}, bert_dir / "model.safetensors")
    p = run("quantize", "--model", str(bert_dir), "--out", str(tmp_path / "o"))
    assert_user_error(p, "not a causal language model")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # (tens of seconds; runs with -m slow)
def test_unknown_dataset(tmp_path):
    need(STORIES)
    p = run("quantize", "--method", "gptq", "--model", str(STORIES), "--dataset", "no-such-set", "--out", str(tmp_path / "o"))
    assert_user_error(p, "unknown dataset")
    assert leftovers(tmp_path) == []
    p = run("eval", "--model", str(STORIES), "--dataset", str(tmp_path / "missing.txt"))
    assert_user_error(p, "does not exist")


@pytest.mark.slow  # (tens of seconds; runs with -m slow)
def test_seqlen_beyond_context(tmp_path):
    need(STORIES)
    p = run("quantize", "--method", "gptq", "--model", str(STORIES), "--dataset", str(need(TINYSTORIES)),
            "--seqlen", "4096", "--out", str(tmp_path / "o"))
    assert_user_error(p, "context length 512")
    assert leftovers(tmp_path) == []
    p = run("eval", "--model", str(STORIES), "--dataset", str(TINYSTORIES), "--seqlen", "4096")
    assert_user_error(p, "context length 512")


@pytest.mark.slow  # (tens of seconds; runs with -m slow)
def test_output_not_writable(tmp_path):
    need(STORIES)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run("quantize", "--model", str(STORIES), "--out", str(blocker / "sub" / "o"))
    assert_user_error(p, "cannot create output directory")
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep").write_text("x")
    p = run("quantize", "--model", str(STORIES), "--out", str(out))
    assert_user_error(p, "not empty")
    assert leftovers(out) == ["keep"]


def test_bad_options(tmp_path):
    need(STORIES)
    p = run("quantize", "--model", str(STORIES), "--bits", "5", "--out", str(tmp_path / "o"))
    assert_user_error(p, "--bits")
    bad = tmp_path / "r.yaml"
    bad.write_text("bitz: 4\n")
    p = run("quantize", "--model", str(STORIES), "--config", str(bad), "--out", str(tmp_path / "o"))
    assert_user_error(p, "unknown recipe key 'bitz'")
    assert sorted(leftovers(tmp_path)) == ["r.yaml"]


def test_failure_midway_leaves_no_output(tmp_path):
    """A crash after writing started removes the temporary directory."""
    from llmq.recipe import build_config
    from llmq.pipeline import quantize_model
    from llmq.source import ModelSource

    need(STORIES)
    src = ModelSource(str(STORIES))
    calls = {"n": 0}
    real = src.load_tensor

    def flaky(name):
        calls["n"] += 1
        if calls["n"] > 20:
            raise RuntimeError("disk vanished")
        return real(name)

    src.load_tensor = flaky  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        quantize_model(src, build_config({}, {"method": "rtn", "group_size": 32}), tmp_path / "o", progress=False)
    assert leftovers(tmp_path) == []


def test_quantize_and_eval_cli(tmp_path):
    """The README flow: INT8 RTN within 1% of FP32, INT4 worse than INT8."""
    need(STORIES)
    text = str(need(TINYSTORIES))
    ppl = {}
    for bits, gs in ((8, "-1"), (4, "32")):
        out = tmp_path / f"w{bits}"
        p = run("quantize", "--quiet", "--method", "rtn", "--bits", str(bits), "--group-size", gs, "--model", str(STORIES), "--out", str(out))
        assert p.returncode == 0, p.stderr
        p = run("eval", "--quiet", "--model", str(out), "--dataset", text, "--seqlen", "512", "--reference", str(STORIES),
                "--json", str(tmp_path / f"w{bits}.json"))
        assert p.returncode == 0, p.stderr
        assert "perplexity" in p.stdout
        ppl[bits] = json.loads((tmp_path / f"w{bits}.json").read_text())
    fp = ppl[8]["reference_ppl"]
    assert abs(fp - 5.56) < 0.01  # the published FP32 number for this model and text
    assert abs(ppl[8]["ppl"] - fp) / fp < 0.01
    assert ppl[4]["ppl"] > ppl[8]["ppl"] and ppl[4]["kld"] > ppl[8]["kld"]


def test_help_lists_working_subcommands():
    p = run("--help")
    assert p.returncode == 0 and "quantize" in p.stdout and "eval" in p.stdout


def test_full_range_is_refused_where_the_format_fits_its_own_grids(tmp_path):
    need(STORIES)
    for fmt in (("--format", "gguf", "--gguf-type", "Q4_0"), ("--format", "bitsandbytes")):
        p = run("quantize", "--model", str(STORIES), "--full-range", *fmt, "--out", str(tmp_path / "o"))
        assert_user_error(p, "--full-range applies to symmetric integer grids")
    assert leftovers(tmp_path) == []
    (tmp_path / "r.yaml").write_text("full_range: yes please\n")
    p = run("quantize", "--model", str(STORIES), "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o"))
    assert_user_error(p, "full_range must be true or false")


@pytest.mark.slow  # (tens of seconds; runs with -m slow)
def test_gguf_cli_errors(tmp_path):
    from conftest import save_tiny

    src = save_tiny("opt", tmp_path / "neox")
    p = run("quantize", "--model", str(src), "--format", "gguf", "--gguf-type", "Q4_0", "--out", str(tmp_path / "m.gguf"))
    assert_user_error(p, "GGUF export supports")
    neox = save_tiny("gpt_neox", tmp_path / "neox2")  # supported, but saved without a tokenizer: refused before calibrating
    p = run("quantize", "--model", str(neox), "--format", "gguf", "--gguf-type", "Q4_0", "--method", "gptq", "--out", str(tmp_path / "m.gguf"))
    assert_user_error(p, "cannot describe the tokenizer")
    shutil.rmtree(neox)
    need(STORIES)
    p = run("quantize", "--model", str(STORIES), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert_user_error(p, "--gguf-type")
    p = run("eval", "--model", str(tmp_path / "missing.gguf"))
    assert_user_error(p, "does not exist")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["neox"]


def test_stories260k_gguf_falls_back_for_odd_widths(tmp_path):
    """stories260K's 64-wide rows cannot form 256-value K-quant super-blocks (Q5_0 instead, as
    llama.cpp does) and its 172-wide ones not even 32-blocks (F16); the user is told."""
    need(STORIES)
    out = tmp_path / "s.gguf"
    p = run("quantize", "--quiet", "--method", "rtn", "--model", str(STORIES), "--format", "gguf", "--gguf-type", "Q4_K", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "blk.0.ffn_down.weight: 172 columns do not fit Q4_K blocks; written as F16" in p.stdout
    assert "blk.0.ffn_up.weight: 64 columns do not fit Q4_K blocks; written as Q5_0" in p.stdout
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q5_0"
    assert types["token_embd.weight"] == "Q8_0"  # tied head: Q6_K wanted, 64 wide, so Q8_0
