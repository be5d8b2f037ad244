"""The float dtypes llmq reads and writes, by the names recipes, configs and flags use."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from llmq.errors import LlmqError

FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # (also the cast methods' and export's names)


COMPUTE_DTYPES = ("auto", *FLOAT_DTYPES)


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


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (AMX tiles or AVX512-BF16), which oneDNN uses: bf16
    products then run 2-5x faster than fp32 ones.  Without them bf16 is emulated, and slower."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes)


def compute_dtype(name: str, source: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype calibration runs in.  ``auto``: the model's own on a GPU, as every GPU tool runs it;
    on a CPU the model's own when it is bf16 and the CPU has bf16 units, else float32 (fp16
    products are slow on CPUs, and a float32 model's activations would lose bits)."""
    if name != "auto":
        return torch_dtype(name)
    if torch.device(device).type != "cpu":
        return source
    return torch.bfloat16 if source == torch.bfloat16 and cpu_multiplies_bf16() else torch.float32


def autocast_bf16(name: str, device: torch.device) -> bool:
    """Whether a learning loop's products run in bf16 autocast: ``auto`` where they run on bf16 units (a
    GPU, a CPU with AMX/AVX512-BF16), else as ``bfloat16`` / ``float32`` says."""
    if name == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_multiplies_bf16())
    return name == "bfloat16"


@contextmanager
def bf16_products(on: bool = True) -> Iterator[None]:
    """Within: CPU float32 matrix products run on bf16 units with float32 accumulation (oneDNN's
    ``fp32_precision = "bf16"``).  Exact, up to the summation order, for operands holding bf16
    values, such as the upcast activations of a bf16 calibration: their Gram matrices then cost
    about half the float32 time.  Off (a no-op) unless ``on`` and the CPU has bf16 units."""
    if not (on and cpu_multiplies_bf16()):
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before
