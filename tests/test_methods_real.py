"""On a real trained model, calibration must pay off: GPTQ's KL divergence to the FP32 model is below RTN's."""

from __future__ import annotations

import pytest

from conftest import C4, STORIES, need
from llmq.checkpoint import load_model
from llmq.recipe import build_config
from llmq.data import eval_tokens
from llmq.eval import evaluate
from llmq.pipeline import quantize_model
from llmq.source import ModelSource


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_stories260k(tmp_path, tinystories_text, bits):
    need(STORIES)
    reference, source = load_model(str(STORIES))
    tokens = eval_tokens(source.tokenizer(), str(tinystories_text))
    result = {}
    for method in ("rtn", "gptq"):
        cfg = build_config({}, {"method": method, "bits": bits, "group_size": 32, "dataset": str(need(C4)), "nsamples": 32,
                                "seqlen": 512, "dtype": "float32"})
        quantize_model(ModelSource(str(STORIES)), cfg, tmp_path / method, progress=False)
        model, _ = load_model(str(tmp_path / method))
        result[method] = evaluate(model, tokens, 512, reference=reference, progress=False, batch_size=8)
    assert result["gptq"].kld < 0.85 * result["rtn"].kld
    assert result["gptq"].ppl < result["rtn"].ppl
