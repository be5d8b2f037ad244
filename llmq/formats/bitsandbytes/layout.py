"""The bitsandbytes checkpoint layout transformers saves and loads (``quantization_config.quant_method:
bitsandbytes``), written and read without bitsandbytes installed (it is all plain tensors).

4-bit (NF4/FP4), per linear (out x in), blocks of 64 values along the flattened rows:
  weight                                  uint8 (out*in/2, 1)  two codes a byte, the first in the high nibble
  weight.absmax                           fp32 per block; with double quantization uint8 codes of it, and
  weight.nested_absmax, .nested_quant_map fp32 per 256 absmax codes, and the 256-value dynamic map
  weight.quant_map                        the 16-value code table
  weight.quant_state.bitsandbytes__nf4    (or __fp4) the JSON of quant_type, blocksize, dtype, shape, nested_*
LLM.int8 (8-bit): weight int8 (out, in), SCB fp32 (out), weight_format uint8 0 (row-major).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from llmq.formats.bitsandbytes.grids import NESTED_BLOCK, FourBitGrid, Int8RowGrid, code_table, dynamic_map
from llmq.formats.base import Format, refuse
from llmq.grid import Grid
from llmq.qtensor import QuantizedTensor

STATE = "weight.quant_state.bitsandbytes__"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _json_tensor(d: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


class BitsAndBytesFormat(Format):
    name = "bitsandbytes"
    quant_method = "bitsandbytes"
    # (a packed linear keeps "weight" as its name: the quant-state or SCB tensor marks it)
    markers = (STATE + "nf4", STATE + "fp4", "SCB")
    suffixes = (*markers, "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                "weight_format")

    def __init__(self, dtype: str = "float16"):
        self.dtype = dtype  # what bitsandbytes dequantizes to (the original weights' dtype, the compute dtype)

    def for_dtype(self, dtype: str) -> "BitsAndBytesFormat":
        return BitsAndBytesFormat(dtype)

    def check(self, grid: Grid) -> None:
        if not isinstance(grid, (FourBitGrid, Int8RowGrid)):
            raise refuse(self.name, f"bitsandbytes stores NF4/FP4 (--bits 4) or LLM.int8 (--bits 8) codes, not the {grid.name} grid")

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        self.check(qt.grid)
        if isinstance(qt.grid, Int8RowGrid):
            return {"weight": (qt.codes.to(torch.int16) - 128).to(torch.int8), "SCB": qt.scales[:, 0].float().contiguous(),
                    "weight_format": torch.tensor(0, dtype=torch.uint8)}
        grid: FourBitGrid = qt.grid
        out, inp = qt.shape
        if grid.blocksize not in BLOCKSIZES:
            raise refuse(self.name, f"bitsandbytes has no blocksize {grid.blocksize}")
        q = qt.codes.reshape(-1)
        if q.numel() % 2:
            q = torch.cat([q, q.new_zeros(1)])
        t = {"weight": ((q[0::2] << 4) | q[1::2]).reshape(-1, 1), "weight.quant_map": code_table(grid.quant_type)}
        state = {"quant_type": grid.quant_type, "blocksize": grid.blocksize, "dtype": self.dtype, "shape": [out, inp]}
        if grid.double_quant:
            t.update({"weight.absmax": qt.stored["nested_codes"].reshape(-1), "weight.nested_absmax": qt.stored["nested_absmax"],
                      "weight.nested_quant_map": dynamic_map()})
            state.update(nested_blocksize=NESTED_BLOCK, nested_dtype="float32", nested_offset=float(qt.stored["nested_offset"]))
        else:  # (flat: every value carries its block's absmax; a block's first value gives it)
            scales = qt.scales.reshape(-1).float()
            t["weight.absmax"] = (scales[:: grid.blocksize] if grid.flat else scales).contiguous()
        t[STATE + grid.quant_type] = _json_tensor(state)
        return t

    def nbytes(self, out: int, inp: int, grid: Grid) -> int:
        if isinstance(grid, Int8RowGrid):
            return out * inp + 4 * out + 1
        blocks = -(-out * inp // grid.blocksize)
        absmax = blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * 256 if grid.double_quant else 4 * blocks
        state = {"quant_type": grid.quant_type, "blocksize": grid.blocksize, "dtype": self.dtype, "shape": [out, inp]}
        if grid.double_quant:  # (the offset's digits vary by a few bytes: a typical fp32 value's, printed as JSON)
            state.update(nested_blocksize=NESTED_BLOCK, nested_dtype="float32", nested_offset=0.13058871030807495)
        return -(-out * inp // 2) + absmax + 4 * 16 + len(json.dumps(state))

    def unpack(self, tensors: dict[str, torch.Tensor], grid: Grid, shape: tuple[int, int]) -> QuantizedTensor:
        out, inp = shape
        if "SCB" in tensors:
            g = Int8RowGrid()
            return QuantizedTensor(codes=(tensors["weight"].to(torch.int16) + 128).to(torch.uint8).reshape(out, inp),
                                   scales=tensors["SCB"].float().reshape(out, 1), zeros=torch.full((out, 1), 128, dtype=torch.uint8),
                                   g_idx=torch.zeros(inp, dtype=torch.int32), grid=g)
        key = next(k for k in tensors if k.startswith(STATE))
        state = json.loads(bytes(tensors[key].tolist()).decode("utf-8"))
        g = FourBitGrid(state["quant_type"], int(state["blocksize"]), "nested_blocksize" in state)
        if list(state["shape"]) != [out, inp]:
            raise ValueError(f"a {state['shape']} tensor is not this {out}x{inp} linear")
        if not torch.equal(tensors["weight.quant_map"].float(), code_table(g.quant_type)):
            raise ValueError("its 4-bit code table is not bitsandbytes' own")
        packed = tensors["weight"].reshape(-1).view(torch.uint8)
        q = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[: out * inp]
        absmax, stored = tensors["weight.absmax"], {}
        if g.double_quant:
            codes, a2 = absmax.reshape(-1).to(torch.uint8), tensors["weight.nested_absmax"].float()
            per = torch.repeat_interleave(a2, NESTED_BLOCK)[: codes.numel()]
            absmax = tensors["weight.nested_quant_map"].float()[codes.long()] * per + torch.tensor(state["nested_offset"], dtype=torch.float32)
            stored = {"nested_codes": codes, "nested_absmax": a2, "nested_offset": torch.tensor(state["nested_offset"])}
        g = g.for_width(inp)  # (blocks run across rows where rows are no whole blocks)
        scales = g.per_group(absmax.float().reshape(-1), (out, inp))
        return QuantizedTensor(codes=q.reshape(out, inp), scales=scales, zeros=torch.zeros_like(scales, dtype=torch.uint8),
                               g_idx=(torch.arange(inp) // g.group_size).to(torch.int32), grid=g, stored=stored)

    def quantization_config(self, grid: Grid, extra: dict[str, Any]) -> dict[str, Any]:
        four = isinstance(grid, FourBitGrid)
        return {"quant_method": "bitsandbytes", "load_in_4bit": four, "load_in_8bit": not four,
                "_load_in_4bit": four, "_load_in_8bit": not four,
                "bnb_4bit_quant_type": grid.quant_type if four else "fp4",
                "bnb_4bit_use_double_quant": bool(four and grid.double_quant),
                "bnb_4bit_compute_dtype": self.dtype, "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": extra.get("ignore") or None, "llm_int8_threshold": 6.0,
                "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}

    def grid_from_config(self, qcfg: dict[str, Any]) -> Grid:
        if qcfg.get("load_in_4bit") or qcfg.get("_load_in_4bit"):
            return FourBitGrid(qcfg.get("bnb_4bit_quant_type", "fp4"), 64, bool(qcfg.get("bnb_4bit_use_double_quant")))  # (per tensor: its state)
        if qcfg.get("load_in_8bit") or qcfg.get("_load_in_8bit"):
            return Int8RowGrid()
        raise refuse(self.name, "a bitsandbytes config that is neither 4-bit nor 8-bit")

