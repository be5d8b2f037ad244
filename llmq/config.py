"""Run configuration as data: what a recipe file or the command line asks for.

A recipe holds the keys of :class:`QuantizeConfig` (calibration keys nested under
``calibration:``, or flat) and the method's own keys (``damp``, ``awq_clip``, ...), which stay
in ``options`` until the method reads them (llmq.methods.options_for).  Parsing and checking
live in llmq.recipe; the frozen plan of a run in llmq.plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmq.errors import LlmqError


@dataclass
class CalibConfig:
    dataset: str | None = None  # None: the method's default (c4 for GPTQ, pile-val for AWQ)
    split: str | None = None
    nsamples: int = 128
    seqlen: int | None = None  # None: the method's default (2048, AWQ 512), capped by the model's context
    seed: int = 0


@dataclass
class QuantizeConfig:
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    sym: bool = True
    grid_search: bool | None = None  # integer grids: search each group's range for the least diag(H)-weighted error (None: the method's default)
    full_range: bool = False  # symmetric integer grids: each group's larger extreme on the end level, a signed scale (llmq.grid)
    format: str | None = None  # None: gptq (v1) for symmetric grids, gptq_v2 for asymmetric ones
    gguf_type: str | None = None  # with format gguf: a block type, a mix or a float type (llmq.gguf.types)
    gguf_token_embedding_type: str | None = None  # None: llama-quantize's choice (the base type)
    gguf_output_type: str | None = None  # None: llama-quantize's choice
    bnb_4bit_quant_type: str = "nf4"  # with format bitsandbytes and 4 bits: nf4 or fp4 (names as transformers' BitsAndBytesConfig)
    bnb_4bit_use_double_quant: bool = False  # quantize the 4-bit blocks' absmax values again (8-bit, blocks of 256)
    dtype: str = "float16"  # dtype of the tensors that stay unquantized (embeddings, norms, biases)
    compute_dtype: str = "auto"  # calibration's dtype; auto: the model's on a GPU, and on a CPU with bf16 units when it is bf16 (llmq.dtypes)
    max_shard_size: str = "4GB"
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    rules: list[Any] = field(default_factory=list)  # per-module precision rules, first match wins (llmq.rules)
    target_size: str | None = None  # allocate bits per module so the weight files fit this size (llmq.allocate)
    target_bpw: float | None = None  # the same, as bits per parameter of the whole model
    allocate_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])  # the allocation's candidate grids
    allocate_group_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])  # (with the recipe's group size)
    allocate_gguf_types: list[str] | None = None  # None: llmq.gguf.types.ALLOCATION_TYPES
    tune_steps: int = 0  # then tune the scales end to end for this many steps (llmq.tune; 0: not)
    tune_lr: float = 2e-3  # its learning rate (1e-3 left 2-4% more KL: eval/results/tune.md)
    tune_batch: int = 8  # and calibration windows per step
    tune_head: bool = True  # and the output head's weights too, where stored in float (eval/results/tune.md)
    tune_codes: bool = True  # and each integer code, by at most one step (eval/results/tune.md)
    tune_sampled: int = 0  # and this many windows the unquantized model writes itself, added to the calibration's
    tune_recompute: bool = False  # and each decoder layer's activations formed again in the backward (less memory)
    calibration: CalibConfig = field(default_factory=CalibConfig)
    options: dict[str, Any] = field(default_factory=dict)  # the method's own keys, as given

    def format_name(self) -> str:
        return self.format or ("gptq" if self.sym else "gptq_v2")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GENERIC_KEYS = frozenset(f.name for f in dataclasses.fields(QuantizeConfig)) - {"calibration", "options"}
CALIB_KEYS = frozenset(f.name for f in dataclasses.fields(CalibConfig))


def parse_size(text: str | int) -> int:
    """'4GB', '500MB', '1.5GiB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            s, m = s[: -len(unit)], mult
            break
    else:
        m = 1
    try:
        value = int(float(s) * m)
    except ValueError:
        raise LlmqError(f"cannot read size {text!r}; use e.g. 4GB or 500MB") from None
    if value <= 0:
        raise LlmqError(f"size must be positive, got {text!r}")
    return value
