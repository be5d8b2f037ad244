"""llmq's own lossless layout: a QuantizedTensor's fields stored as they are.

No runtime reads it; it holds a quantized model between the method and a GGUF file (one
linear may be Q6_K and the next Q4_K, and K-quant grids carry float minimums that no GPTQ-style
layout can store).  Each linear records its own grid, so mixes need nothing in config.json.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from llmq.formats.base import Format
from llmq.grid import QuantSpec
from llmq.qtensor import QuantizedTensor


def _spec_tensor(spec: QuantSpec) -> torch.Tensor:
    text = json.dumps({"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "grid": spec.grid})
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


class RawFormat(Format):
    name = "raw"
    quant_method = "llmq_raw"
    suffixes = ("codes", "scales", "zeros", "offsets", "g_idx", "spec")

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        t = {"codes": qt.codes.contiguous(), "scales": qt.scales.contiguous(), "zeros": qt.zeros.contiguous(),
             "g_idx": qt.g_idx.contiguous(), "spec": _spec_tensor(qt.spec)}
        if qt.offsets is not None:
            t["offsets"] = qt.offsets.contiguous()
        return t

    def nbytes(self, out: int, inp: int, spec: QuantSpec) -> int:
        groups = spec.groups(inp)
        return out * inp + groups * out * (4 + 1 + (4 if spec.has_offsets else 0)) + 4 * inp + len(_spec_tensor(spec))

    def unpack(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> QuantizedTensor:
        s = json.loads(bytes(tensors["spec"].tolist()).decode())
        return QuantizedTensor(codes=tensors["codes"], scales=tensors["scales"].float(), zeros=tensors["zeros"],
                               g_idx=tensors["g_idx"].to(torch.int32), spec=QuantSpec(**s), offsets=tensors.get("offsets"))

    def quantization_config(self, spec: QuantSpec, extra: dict[str, Any]) -> dict[str, Any]:
        # the recipe's grid, for the record: each linear's own grid is stored beside its codes
        return {"quant_method": self.quant_method, "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
                "grid": spec.grid, "meta": {"quantizer": [f"llmq:{extra.get('version', '')}"], "method": extra.get("method")}}

    def spec_from_config(self, qcfg: dict[str, Any]) -> QuantSpec:
        grid = qcfg.get("grid", "minmax")
        if grid != "minmax":
            return QuantSpec.for_gguf(grid)
        return QuantSpec(bits=int(qcfg.get("bits", 4)), group_size=int(qcfg.get("group_size", 128)), sym=bool(qcfg.get("sym", True)))
