"""One rank of a torchrun launch in tests/test_distributed.py: quantize MODEL into OUT with the
recipe given as JSON, on random calibration ids that every rank draws alike."""

from __future__ import annotations

import json
import sys

import torch

from llmq.distributed import join, leave
from llmq.pipeline import quantize_model
from llmq.recipe import build_config
from llmq.source import ModelSource


def calibration_ids(n: int, seqlen: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(1))


def main() -> None:
    model, out, recipe = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    ranks, device = join("cpu")
    try:
        ids = calibration_ids(recipe["nsamples"], recipe["seqlen"], int(sys.argv[4]))
        quantize_model(ModelSource(model), build_config({}, recipe), out, progress=False, calib_ids=ids, ranks=ranks)
    finally:
        leave()


if __name__ == "__main__":
    main()
