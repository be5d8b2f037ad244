"""The GPTQ checkpoint layout read by transformers, vLLM, GPTQModel and AutoGPTQ.

Per quantized linear (out x in):
  qweight  int32 (ceil(in*bits/32), out)      codes packed along the input dim
  qzeros   int32 (groups, ceil(out*bits/32))  zero points packed along the output dim
  scales   fp16  (groups, out)
  g_idx    int32 (in,)                        group of each input column
``checkpoint_format: gptq`` (v1) stores zero-1, the historical AutoGPTQ convention the
runtimes undo; a recipe whose zeros reach 0 (asymmetric) cannot be stored that way and
is written as ``gptq_v2`` (zeros stored as they are).
"""

from __future__ import annotations

from typing import Any

import torch

from llmq.formats.base import Format
from llmq.formats.packing import pack, unpack
from llmq.grid import QuantSpec
from llmq.qtensor import QuantizedTensor


class GPTQFormat(Format):
    name = "gptq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def checkpoint_format(self, spec: QuantSpec) -> str:
        return "gptq" if spec.sym else "gptq_v2"

    def _zero_offset(self, spec: QuantSpec) -> int:
        return 1 if self.checkpoint_format(spec) == "gptq" else 0

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        spec = qt.spec
        zeros = qt.zeros.to(torch.int64) - self._zero_offset(spec)
        return {
            "qweight": pack(qt.codes.T, spec.bits, dim=0),
            "qzeros": pack(zeros.T, spec.bits, dim=1),
            "scales": qt.scales.T.to(torch.float16).contiguous(),
            "g_idx": qt.g_idx.to(torch.int32).contiguous(),
        }

    def unpack(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int],
               checkpoint_format: str | None = None) -> QuantizedTensor:
        out, inp = shape
        offset = 1 if (checkpoint_format or self.checkpoint_format(spec)) == "gptq" else 0
        codes = unpack(tensors["qweight"], spec.bits, inp, dim=0).T
        zeros = unpack(tensors["qzeros"], spec.bits, out, dim=1).to(torch.int64) + offset
        return QuantizedTensor(
            codes=codes.contiguous(),
            scales=tensors["scales"].float().T.contiguous(),
            zeros=zeros.T.to(torch.uint8).contiguous(),
            g_idx=tensors["g_idx"].to(torch.int32),
            spec=spec,
        )

    def quantization_config(self, spec: QuantSpec, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "quant_method": "gptq",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "sym": spec.sym,
            "desc_act": bool(extra.get("act_order", False)),
            "static_groups": bool(extra.get("static_groups", False)),
            "true_sequential": bool(extra.get("true_sequential", True)),
            "damp_percent": extra.get("damp", 0.01),
            "checkpoint_format": self.checkpoint_format(spec),
            "modules_in_block_to_quantize": extra.get("modules_in_block_to_quantize"),
            "meta": {"quantizer": [f"llmq:{extra.get('version', '')}"], "method": extra.get("method")},
        }

    def spec_from_config(self, qcfg: dict[str, Any]) -> QuantSpec:
        return QuantSpec(bits=int(qcfg["bits"]), group_size=int(qcfg.get("group_size", -1)), sym=bool(qcfg.get("sym", True)))
