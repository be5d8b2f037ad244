"""compressed-tensors ``pack-quantized`` (llm-compressor's format, loaded by transformers and vLLM).

Per quantized linear (out x in):
  weight_packed      int32 (out, ceil(in*bits/32))     codes as one dense bit stream along the input dim
  weight_scale       fp16  (out, groups)
  weight_zero_point  int32 (ceil(out*bits/32), groups) only for asymmetric grids, packed along the output dim
  weight_shape       int64 (2,)
The format's integers are signed (q - 2**(bits-1)) and its packer adds that offset back,
so the packed words equal our unsigned codes packed directly; its symmetric grids have
zero point 0, i.e. our midpoint zero.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from llmq.formats.base import Format, natural_g_idx, refuse, require_int_grid
from llmq.formats.packing import pack, packed_len, unpack
from llmq.grid import IntGrid
from llmq.qtensor import QuantizedTensor


class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    quant_method = "compressed-tensors"
    suffixes = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
    mixes_grids = True  # one config group per grid; exact module names outrank the class target "Linear"

    def check(self, grid: IntGrid) -> None:
        require_int_grid(self.name, grid)

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        require_int_grid(self.name, qt.grid)
        if not natural_g_idx(qt):
            raise refuse(self.name, "codes with an act-order g_idx; quantize with static groups")
        grid = qt.grid
        sym = bool((qt.zeros == 2 ** (grid.bits - 1)).all())
        if grid.sym and not sym:
            raise refuse(self.name, "a symmetric recipe whose zero points are not the midpoint")
        t = {
            "weight_packed": pack(qt.codes, grid.bits, dim=1),
            "weight_scale": qt.scales.to(torch.float16).contiguous(),
            "weight_shape": torch.tensor(qt.shape, dtype=torch.int64),
        }
        if not grid.sym:
            t["weight_zero_point"] = pack(qt.zeros, grid.bits, dim=0)
        return t

    def packed_suffixes(self, grid: IntGrid) -> tuple[str, ...]:
        return self.suffixes if not grid.sym else tuple(s for s in self.suffixes if s != "weight_zero_point")

    def nbytes(self, out: int, inp: int, grid: IntGrid) -> int:
        groups = grid.groups(inp)
        zp = 0 if grid.sym else 4 * packed_len(out, grid.bits) * groups
        return 4 * out * packed_len(inp, grid.bits) + 2 * out * groups + zp + 16

    def unpack(self, tensors: dict[str, torch.Tensor], grid: IntGrid, shape: tuple[int, int]) -> QuantizedTensor:
        out, inp = shape
        groups = tensors["weight_scale"].shape[1]
        if "weight_zero_point" in tensors:
            zeros = unpack(tensors["weight_zero_point"], grid.bits, out, dim=0)
        else:
            zeros = torch.full((out, groups), 2 ** (grid.bits - 1), dtype=torch.uint8)
        gs = inp if grid.group_size == -1 else grid.group_size
        return QuantizedTensor(
            codes=unpack(tensors["weight_packed"], grid.bits, inp, dim=1),
            scales=tensors["weight_scale"].float().contiguous(),
            zeros=zeros.contiguous(),
            g_idx=(torch.arange(inp) // gs).to(torch.int32),
            grid=grid,
        )

    def quantization_config(self, grid: IntGrid, extra: dict[str, Any]) -> dict[str, Any]:
        groups = {"group_0": _group(["Linear"], grid)}
        others: dict[IntGrid, list[str]] = {}
        for name, g in extra.get("grids", {}).items():
            if g != grid:
                others.setdefault(g, []).append(name)
        for i, (g, names) in enumerate(others.items(), 1):
            groups[f"group_{i}"] = _group(sorted(names), g)
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": extra.get("ignore") or ["lm_head"],
            "kv_cache_scheme": None,
        }

    def grid_from_config(self, qcfg: dict[str, Any]) -> IntGrid:
        if qcfg.get("format") != "pack-quantized":
            raise refuse(self.name, f"compressed-tensors format {qcfg.get('format')!r}; llmq reads pack-quantized")
        groups = list(qcfg.get("config_groups", {}).values())
        if not groups or any(g.get("weights") is None for g in groups):
            raise refuse(self.name, "config groups without weight quantization; llmq reads weight-only schemes")
        return _grid(next((g for g in groups if "Linear" in g.get("targets", [])), groups[0])["weights"])

    def module_grid(self, qcfg: dict[str, Any], module: str) -> IntGrid:
        """The scheme compressed-tensors applies: a group naming the module outranks one matching it by
        regex ("re:..."), which outranks the class target "Linear"."""
        self.grid_from_config(qcfg)
        groups = list(qcfg["config_groups"].values())
        for hit in (lambda t: t == module, lambda t: t.startswith("re:") and re.match(t[3:], module), lambda t: t == "Linear"):
            g = next((g for g in groups if any(hit(t) for t in g.get("targets", []))), None)
            if g is not None:
                return _grid(g["weights"])
        raise refuse(self.name, f"no config group targets the packed linear {module!r}")


def _group(targets: list[str], grid: IntGrid) -> dict[str, Any]:
    weights = {
        "num_bits": grid.bits, "type": "int", "symmetric": grid.sym, "dynamic": False, "observer": "minmax",
        "strategy": "channel" if grid.group_size == -1 else "group",
        "group_size": None if grid.group_size == -1 else grid.group_size, "actorder": None,
    }
    return {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
            "format": "pack-quantized"}


def _grid(w: dict[str, Any]) -> IntGrid:
    if w.get("type") != "int" or w.get("actorder") not in (None, "static"):
        raise refuse("compressed-tensors", f"weights of type {w.get('type')!r} / actorder {w.get('actorder')!r}")
    gs = -1 if w.get("strategy") == "channel" else int(w["group_size"])
    return IntGrid(bits=int(w["num_bits"]), group_size=gs, sym=bool(w.get("symmetric", True)))
