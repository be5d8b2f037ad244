"""The report: projection arithmetic checked independently, outputs traceable to records, resumable after a kill."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from conftest import C4, ROOT, STORIES, TINYSTORIES, need
from llmq.recipe import build_config
from llmq.projection import meta_model, parameter_count, project

LLAMA7B = ROOT / "configs" / "models" / "llama-2-7b.json"


def test_fp16_projection_is_two_bytes_per_parameter():
    m = meta_model(LLAMA7B)
    assert parameter_count(m) == 6_738_415_616
    assert project(m, build_config({}, {"method": "fp16"}))["total_bytes"] == 2 * 6_738_415_616


def test_int4_g128_projection_matches_hand_count():
    """qweight/qzeros/scales/g_idx of every decoder linear of Llama-2-7B, counted by hand from the GPTQ layout."""
    h, inter, layers, vocab = 4096, 11008, 32, 32000
    shapes = [(h, h)] * 4 + [(inter, h)] * 2 + [(h, inter)]  # (out, in): q k v o, gate up, down
    lin = 0
    for out, inp in shapes:
        groups = math.ceil(inp / 128)
        lin += (inp * 4 // 32) * out * 4 + groups * (out * 4 // 32) * 4 + groups * out * 2 + inp * 4
    lin *= layers
    floats = 2 * (2 * vocab * h + (2 * layers + 1) * h)  # fp16 embed + head + norms
    r = project(meta_model(LLAMA7B), build_config({}, {"method": "gptq", "bits": 4, "group_size": 128}))
    assert r["quantized_linears"] == lin
    assert r["total_bytes"] == lin + floats


def _report_cmd(out, suite):
    return [sys.executable, "-m", "llmq", "report", "--quiet", "--model", str(STORIES), "--suite", str(suite),
            "--out", str(out), "--eval", f"tiny={TINYSTORIES}", "--calib-dataset", str(C4), "--seqlen", "128",
            "--nsamples", "8", "--max-windows", "20"]


@pytest.mark.slow  # (tens of seconds; runs with -m slow)
def test_report_outputs_traceable_and_resumable(tmp_path):
    need(STORIES), need(TINYSTORIES), need(C4)
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: t\neval: [tiny]\nprojection: " + str(LLAMA7B) + "\nvariants:\n"
        "  - {name: FP32, method: fp32}\n  - {name: INT8 RTN, method: rtn, bits: 8, group_size: -1}\n"
        "  - {name: INT4 RTN, method: rtn, bits: 4, group_size: 32}\n  - {name: INT4 GPTQ, method: gptq, bits: 4, group_size: 32}\n")
    out = tmp_path / "rep"
    # Start, kill as soon as the first variant's record exists, then run again.
    p = subprocess.Popen(_report_cmd(out, suite), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "variants" / "fp32" / "record.json"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.kill()
    p.wait()
    assert first.exists()
    stamp = first.stat().st_mtime_ns
    ckpt_stamp = (out / "variants" / "fp32" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    done = subprocess.run(_report_cmd(out, suite), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "[FP32] finished earlier" in done.stdout
    assert first.stat().st_mtime_ns == stamp
    assert (out / "variants" / "fp32" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == ckpt_stamp
    for f in ("report.md", "report.csv", "report.json", "size_vs_ppl.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "size_vs_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every perplexity in report.md is one recorded by a variant run
    records = [json.loads(f.read_text()) for f in sorted(out.glob("variants/*/record.json"))]
    assert len(records) == 4
    md = (out / "report.md").read_text()
    for r in records:
        assert f"{r['eval']['tiny']['ppl']:.4f}" in md
        assert r["file_bytes"] == sum(p.stat().st_size for p in (out / "variants" / r["slug"] / "checkpoint").glob("*.safetensors"))
    by = {r["variant"]: r for r in records}
    assert by["INT4 GPTQ"]["eval"]["tiny"]["kld"] < by["INT4 RTN"]["eval"]["tiny"]["kld"]
    assert by["FP32"]["bits_per_weight"] == pytest.approx(32, rel=0.01)


def test_pareto_front():
    from llmq.plot import pareto_front

    pts = [(32, 5.0), (16, 5.0), (8, 5.1), (4.5, 6.0), (4.5, 6.5), (3.5, 9.0)]
    assert pareto_front(pts) == [5, 3, 2, 1]


def test_gguf_projection_matches_block_arithmetic():
    """Q4_0 on Llama-2-7B: 18 bytes per 32 weights (linears and token embedding), the head at Q6_K
    (210 bytes per 256, as llama-quantize does), F32 norms."""
    h, inter, layers, vocab = 4096, 11008, 32, 32000
    linear_weights = layers * (4 * h * h + 3 * h * inter)
    expected = (linear_weights + vocab * h) // 32 * 18 + vocab * h // 256 * 210 + 4 * (2 * layers + 1) * h
    r = project(meta_model(LLAMA7B), build_config({}, {"method": "gptq", "format": "gguf", "gguf_type": "Q4_0"}))
    assert r["total_bytes"] == expected
    assert r["bits_per_quantized_weight"] == 4.5


@pytest.mark.parametrize("gtype,published_gb", [("Q4_0", 3.83), ("Q4_K_M", 4.08), ("Q5_0", 4.65), ("Q5_K_M", 4.78),
                                                ("Q6_K", 5.53), ("Q8_0", 7.16)])
def test_gguf_projection_matches_published_llama2_files(gtype, published_gb):
    """The llama.cpp files of Llama-2-7B published on the Hub (TheBloke/Llama-2-7B-GGUF, sizes in GB as
    listed there; they include ~1 MB of metadata and vocabulary): the projection lands on them."""
    r = project(meta_model(LLAMA7B), build_config({}, {"method": "gptq", "format": "gguf", "gguf_type": gtype}))
    assert abs(r["total_bytes"] / 1e9 - published_gb) < 0.006
