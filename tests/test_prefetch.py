"""The next layer read ahead on a background thread: the same tensors, the same output, errors on take."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from conftest import save_tiny
from llmq import pipeline
from llmq.errors import LlmqError
from llmq.prefetch import LayerPrefetch
from llmq.recipe import build_config
from llmq.source import ModelSource


def test_read_ahead_tensors_are_the_source_tensors(tmp_path):
    source = ModelSource(str(save_tiny("llama", tmp_path / "src")))
    model = source.skeleton(torch.float32)
    with LayerPrefetch(source, model, torch.bfloat16, active=True) as ahead:
        ahead.start("model.layers.1")
        assert ahead.take("model.layers.0") is None  # never started
        got = ahead.take("model.layers.1")
    expected = {n: source.load_tensor(f"model.layers.1.{n}") for n, _ in model.model.layers[1].named_parameters()}
    assert got.keys() == expected.keys()
    for n, t in expected.items():
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], t.to(torch.bfloat16)), n


def test_inactive_reads_nothing(tmp_path):
    source = ModelSource(str(save_tiny("llama", tmp_path / "src")))
    with LayerPrefetch(source, source.skeleton(torch.float32), torch.float32, active=False) as ahead:
        ahead.start("model.layers.1")
        assert ahead.take("model.layers.1") is None


def test_a_read_error_is_raised_by_take(tmp_path, monkeypatch):
    source = ModelSource(str(save_tiny("llama", tmp_path / "src")))

    def broken(name):
        raise LlmqError(f"cannot read tensor {name!r}")

    monkeypatch.setattr(source, "load_tensor", broken)
    with LayerPrefetch(source, source.skeleton(torch.float32), torch.float32, active=True) as ahead:
        ahead.start("model.layers.1")
        with pytest.raises(LlmqError, match="cannot read tensor 'model.layers.1"):
            ahead.take("model.layers.1")


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_pipeline_with_read_ahead_writes_the_same_bytes(tmp_path, monkeypatch, method):
    """Prefetching is for GPU runs; forced on here, on the CPU, every layer but the first comes from the
    background thread, and the weight files are the same bytes."""
    src = ModelSource(str(save_tiny("llama", tmp_path / "src", layers=3)))
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = build_config({}, {"method": method, "bits": 4, "group_size": 32, "nsamples": 4, "seqlen": 32})
    pipeline.quantize_model(src, cfg, tmp_path / "plain", progress=False, calib_ids=ids)

    readers = []
    real_read = src.read

    def read(module, prefix, dtype):
        readers.append((prefix, threading.current_thread().name))
        return real_read(module, prefix, dtype)

    monkeypatch.setattr(src, "read", read)
    monkeypatch.setattr(pipeline, "LayerPrefetch", lambda *a, active: LayerPrefetch(*a, active=True))
    pipeline.quantize_model(src, cfg, tmp_path / "ahead", progress=False, calib_ids=ids)
    ahead = {p for p, thread in readers if thread.startswith("llmq-prefetch")}
    assert ahead == {"model.layers.1", "model.layers.2"}
    assert _files(tmp_path / "ahead") == _files(tmp_path / "plain")
