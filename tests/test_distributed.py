"""torchrun --nproc-per-node 2 (gloo, CPU) writes the very checkpoint one process writes (with the same
threads per process): same integer codes, same scales, on a dense model and on a mixture-of-experts one (whose
expert solves are dealt out to the ranks), for GPTQ, AWQ (scale errors and clip samples gathered over the ranks),
AWQ+GPTQ, learned rounding (gradients summed over the ranks) and GPTQ with fp_targets (cross moments summed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, STORIES, TINYSTORIES, need, save_tiny
from distributed_worker import calibration_ids
from llmq.distributed import Ranks
from llmq.pipeline import quantize_model
from llmq.recipe import build_config
from llmq.source import ModelSource

HERE = Path(__file__).resolve().parent
VOCAB, SEQ = 128, 32


def _torchrun(model: Path, out: Path, recipe: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(HERE / "distributed_worker.py"), str(model), str(out), json.dumps(recipe), str(VOCAB)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _moe(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                               num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


SLOW = pytest.mark.slow  # (each torchrun launch costs ~25 s: the default suite keeps one per method)
CASES = [pytest.param("dense", "gptq", 16, {}, id="gptq-dense"), pytest.param("moe", "gptq", 24, {}, id="gptq-moe"),
         pytest.param("dense", "awq", 16, {}, id="awq-dense"), pytest.param("moe", "awq", 24, {}, id="awq-moe", marks=SLOW),
         pytest.param("dense", "awq+gptq", 16, {}, id="awq+gptq-dense", marks=SLOW),
         # (batches of 6 windows cross the ranks' shares of 8: each rank adds its part of a step's gradient)
         pytest.param("dense", "signround", 16, {"iters": 10, "batch": 6}, id="signround-dense"),
         pytest.param("moe", "gptq-fp_targets", 24, {"fp_targets": 0.5}, id="gptq-fp_targets-moe", marks=SLOW)]


@pytest.mark.parametrize("kind,method,nsamples,extra", CASES)
def test_two_processes_write_the_one_process_checkpoint(tmp_path, kind, method, nsamples, extra):
    src = save_tiny("llama", tmp_path / "src") if kind == "dense" else _moe(tmp_path / "src")
    recipe = {"method": method.split("-")[0], "bits": 4, "group_size": 32, "seqlen": SEQ, "nsamples": nsamples, "dtype": "float32",
              "format": "gptq", **extra}
    done = _torchrun(src, tmp_path / "two", recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = calibration_ids(nsamples, SEQ, VOCAB)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun gives each rank: BLAS may sum in another order with more threads
    try:
        quantize_model(ModelSource(str(src)), build_config({}, recipe), tmp_path / "one", progress=False, calib_ids=ids)
    finally:
        torch.set_num_threads(threads)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    if method == "signround":  # (the learning really moved codes, so the summed gradients mattered)
        log = [json.loads(line) for line in (tmp_path / "two" / "llmq_quantize_log.jsonl").read_text().splitlines()]
        assert any(r.get("codes_changed", 0) > 0 for r in log)
    if method == "awq":  # (the scales really were searched: some norm weights moved)
        ref = load_file(src / "model.safetensors")
        assert any(not torch.equal(one[k], ref[k]) for k in one if k.endswith("layernorm.weight"))
    assert sum(k.endswith(".qweight") for k in one) >= (7 if kind == "dense" else 4 + 2 * 8 * 3)
    for k in one:
        assert torch.equal(one[k], two[k]), k
    prov = json.loads((tmp_path / "two" / "llmq_provenance.json").read_text())
    assert "processes" in json.dumps(prov)


def test_windows_are_whole_batches_shared_out_in_order():
    for n, world in [(16, 2), (24, 2), (100, 3), (8, 1)]:
        shares = [Ranks(r, world).windows(n, 8) for r in range(world)]
        assert shares[0].start == 0 and shares[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))
        assert all(s.start % 8 == 0 and s.stop > s.start for s in shares)


@SLOW
def test_allocation_is_refused(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    recipe = {"method": "gptq", "bits": 4, "group_size": 32, "seqlen": SEQ, "nsamples": 16, "dtype": "float32",
              "target_bpw": 4.5}
    done = _torchrun(src, tmp_path / "out", recipe)
    assert done.returncode != 0 and "allocate in one process only" in done.stderr
    assert not (tmp_path / "out").exists()


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks' processes in /proc")
def test_a_rank_that_dies_ends_the_run_on_every_rank(tmp_path):
    """rank 1 killed outright in the middle of the run: rank 0 stops, as on Ctrl-C (torchrun's SIGTERM) or
    with a one-line error (its collective lost the peer), never with a traceback; every process exits,
    the command fails, and neither an output nor rank 0's work directory is left."""
    import signal
    import time

    src = save_tiny("llama", tmp_path / "src", layers=12, hidden=128, inter=256, vocab=512)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(need(STORIES) / f, src / f)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llmq",
           "quantize", "--quiet", "--method", "gptq", "--model", str(src), "--out", str(out),
           "--dataset", str(need(TINYSTORIES)), "--nsamples", "64", "--seqlen", "64"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    work = tmp_path / ".out.llmq-tmp"
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.2)
        if work.is_dir():
            kids = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
            victim = next((int(p) for p in kids if _rank_of(int(p)) == 1), None)
    assert victim is not None, "the run never got going"
    os.kill(victim, signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "llmq: interrupted" in err or "llmq: error: rank 0: another process of this torchrun launch stopped" in err, err
    assert "[rank0]: Traceback" not in err, err
    assert not out.exists() and not work.exists()
    assert not subprocess.run(["pgrep", "-f", str(out)], capture_output=True).stdout
