"""The GPTQ checkpoint layout read by transformers, vLLM, GPTQModel and AutoGPTQ.

Per quantized linear (out x in):
  qweight  int32 (ceil(in*bits/32), out)      codes packed along the input dim
  qzeros   int32 (groups, ceil(out*bits/32))  zero points packed along the output dim
  scales   fp16  (groups, out)
  g_idx    int32 (in,)                        group of each input column
Version 1 (``checkpoint_format: gptq``) stores zero-1, the historical AutoGPTQ convention
the runtimes undo, so a zero point of 0 (asymmetric grids) cannot be stored; version 2
(``gptq_v2``) stores zeros as they are.  Dimensions that do not fill a whole int32 are
zero-padded (runtimes' kernels want in and out to be multiples of 32/bits).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from llmq.formats.base import Format, refuse, require_int_grid
from llmq.formats.packing import pack, packed_len, unpack
from llmq.grid import IntGrid
from llmq.qtensor import QuantizedTensor


# vLLM builds these sibling linears as one (model.layers.3.self_attn.qkv_proj) and looks its dynamic
# override up under the fused name, so a pattern naming the parts must name the whole too.
RUNTIME_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class GPTQFormat(Format):
    quant_method = "gptq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")
    mixes_grids = True  # quantization_config.dynamic, as GPTQModel writes it and vLLM reads it
    quantizes_head = True  # quantization_config.lm_head, read by GPTQModel and vLLM

    def __init__(self, version: str = "gptq"):
        assert version in ("gptq", "gptq_v2")
        self.name = version
        self.version = version
        self.offset = 1 if version == "gptq" else 0

    def check(self, grid: IntGrid) -> None:
        require_int_grid(self.name, grid)
        if self.version == "gptq" and not grid.sym:
            raise refuse("gptq", "v1 stores zero points minus one, so the zero point 0 of asymmetric grids "
                                 "would underflow; use --format gptq_v2 (or compressed-tensors)")

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        grid = qt.grid
        require_int_grid(self.name, grid)
        zeros = qt.zeros.to(torch.int64) - self.offset
        if zeros.min() < 0:
            raise refuse(self.name, "a zero point of 0 cannot be stored as zero-1 in GPTQ v1; use --format gptq_v2")
        return {
            "qweight": pack(qt.codes.T, grid.bits, dim=0),
            "qzeros": pack(zeros.T, grid.bits, dim=1),
            "scales": qt.scales.T.to(torch.float16).contiguous(),
            "g_idx": qt.g_idx.to(torch.int32).contiguous(),
        }

    def nbytes(self, out: int, inp: int, grid: IntGrid) -> int:
        groups = grid.groups(inp)
        return 4 * (packed_len(inp, grid.bits) * out + groups * packed_len(out, grid.bits) + inp) + 2 * groups * out

    def unpack(self, tensors: dict[str, torch.Tensor], grid: IntGrid, shape: tuple[int, int]) -> QuantizedTensor:
        out, inp = shape
        zeros = unpack(tensors["qzeros"], grid.bits, out, dim=1).to(torch.int64) + self.offset
        g_idx = tensors.get("g_idx")
        if g_idx is None:
            g_idx = torch.arange(inp) // grid.effective_group_size(inp)
        return QuantizedTensor(
            codes=unpack(tensors["qweight"], grid.bits, inp, dim=0).T.contiguous(),
            scales=tensors["scales"].float().T.contiguous(),
            zeros=zeros.T.to(torch.uint8).contiguous(),
            g_idx=g_idx.to(torch.int32),
            grid=grid,
        )

    def quantization_config(self, grid: IntGrid, extra: dict[str, Any]) -> dict[str, Any]:
        # desc_act tells runtimes to reorder (vLLM's Marlin sorts g_idx and permutes activations on
        # every call, and keeps whole scales per rank under tensor parallelism), so it is set only
        # when some packed g_idx is not the plain i // group_size (``natural_g_idx``, from the
        # tensors).  Act-order with static groups keeps g_idx plain; the recipe's act-order setting
        # is recorded in ``meta``.
        act_order = bool(extra.get("act_order", False))
        cfg = {
            "quant_method": "gptq",
            "bits": grid.bits,
            "group_size": grid.group_size,
            "sym": grid.sym,
            "desc_act": not extra.get("natural_g_idx", True),
            "static_groups": bool(extra.get("static_groups", False)),
            "true_sequential": bool(extra.get("true_sequential", True)),
            "damp_percent": extra.get("damp", 0.01),
            "checkpoint_format": self.version,
            "meta": {"quantizer": [f"llmq:{extra.get('version', '')}"], "method": extra.get("method"), "act_order": act_order},
        }
        dynamic = _dynamic(grid, extra.get("grids", {}), extra.get("skipped", []))
        if dynamic:
            cfg["dynamic"] = dynamic
        if extra.get("head_quantized"):
            cfg["lm_head"] = True
        return cfg

    def grid_from_config(self, qcfg: dict[str, Any]) -> IntGrid:
        return IntGrid(bits=int(qcfg["bits"]), group_size=int(qcfg.get("group_size", -1)), sym=bool(qcfg.get("sym", True)))

    def module_grid(self, qcfg: dict[str, Any], module: str) -> IntGrid:
        """The base grid with the first matching ``dynamic`` override applied (GPTQModel's and vLLM's rule:
        entries in order, re.match, '-:' excludes, '+:' or no prefix overrides)."""
        base = self.grid_from_config(qcfg)
        for pattern, override in (qcfg.get("dynamic") or {}).items():
            if re.match(pattern.removeprefix("-:").removeprefix("+:"), module):
                if pattern.startswith("-:"):
                    return base
                o = override or {}
                return IntGrid(int(o.get("bits", base.bits)), int(o.get("group_size", base.group_size)), bool(o.get("sym", base.sym)))
        return base


def _dynamic(base: IntGrid, grids: dict[str, IntGrid], skipped: list[str]) -> dict[str, dict[str, Any]]:
    """``quantization_config.dynamic``: one '+:' entry per grid other than the base, naming its linears, and
    one '-:' entry for the decoder linears left unquantized.  Names are anchored, so entries never overlap."""
    by_grid: dict[IntGrid, list[str]] = defaultdict(list)
    for name, g in grids.items():
        if g != base:
            by_grid[g].append(name)
    dynamic = {}
    if skipped:
        dynamic["-:" + _names_pattern(skipped)] = {}
    for g, names in by_grid.items():
        override = {k: v for k, v in (("bits", g.bits), ("group_size", g.group_size), ("sym", g.sym)) if v != getattr(base, k)}
        dynamic["+:" + _names_pattern(names)] = override
    return dynamic


def _names_pattern(names: list[str]) -> str:
    """A regex matching exactly ``names`` and the fused runtime names of sibling sets it holds whole."""
    names = set(names)
    for fused, parts in RUNTIME_FUSED.items():
        for parent in {n.rsplit(".", 1)[0] for n in names if "." in n}:
            if all(f"{parent}.{p}" in names for p in parts):
                names.add(f"{parent}.{fused}")
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"
