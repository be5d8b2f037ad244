"""The float dtypes llmq reads and writes, by the names recipes, configs and flags use."""

from __future__ import annotations

import torch

from llmq.errors import LlmqError

FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # (also the cast methods' and export's names)


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    full = SHORT_NAMES.get(name, name)
    if full not in FLOAT_DTYPES:
        raise LlmqError(f"unknown dtype {name!r}; use {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[full]


def dtype_name(d: torch.dtype | str | None, default: str = "float16") -> str:
    """A dtype (torch.dtype, name or unset) as config.json spells it."""
    if d is None:
        return default
    return str(torch_dtype(d)).removeprefix("torch.")


def nbytes(name: str) -> int:
    return torch.empty(0, dtype=torch_dtype(name)).element_size()
