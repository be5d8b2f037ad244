"""Which GGUF type each tensor of a model gets, and its name in the file.

A `--gguf-type` is either one block type for every decoder linear (Q4_0 ... Q6_K), a mix in the
spirit of llama.cpp's (Q4_K_M / Q5_K_M: attn_v and ffn_down of some layers at Q6_K), or a float
type.  As llama-quantize does, quantized files also store the token embedding at the base type
and the output head at Q6_K; norms stay F32.  A row length a type cannot hold (K-quants need
multiples of 256, the legacy types multiples of 32) falls back to the type llama.cpp substitutes,
and the user is told.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from llmq.gguf.model import GGUF_ARCHS
from llmq.gguf.types import BLOCK_TYPES, FLOAT_TYPES, MIXES, BlockType

# One expert's projection in a checkpoint (model.layers.3.mlp.experts.17.up_proj.weight); llama.cpp
# holds all experts of a projection in one 3-D tensor (blk.3.ffn_up_exps.weight), expert-major.
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")


def expert_index(key: str) -> tuple[str, int] | None:
    """(the key of the stacked tensor, the expert's index) for a per-expert checkpoint key, else None."""
    m = _EXPERT_KEY.match(key)
    return (f"{m[1]}.{m[3]}", int(m[2])) if m else None


def tensor_namer(config: dict[str, Any]) -> Callable[[str], str | None]:
    """HF checkpoint key -> GGUF tensor name (None when gguf knows no name for it); every expert's
    projection gets the name of the stacked tensor that holds it."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == GGUF_ARCHS[config["model_type"]])
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])

    def name(key: str) -> str | None:
        stacked = expert_index(key)
        return names.get_name(stacked[0] if stacked else key, try_suffixes=(".weight", ".bias"))

    return name


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits in its _M mixes: the first and last
    eighth, and every third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class GGUFPlan:
    file_type: str  # a block type, a mix or a float type (types.GGUF_TYPES)
    n_layers: int
    has_output: bool = True  # False: tied embeddings, token_embd doubles as the head
    token_embd_type: str | None = None  # overrides, as llama-quantize's --token-embedding-type
    output_type: str | None = None  # and --output-tensor-type

    @property
    def quantized(self) -> bool:
        return self.file_type not in FLOAT_TYPES

    @property
    def base(self) -> str:
        return MIXES.get(self.file_type, self.file_type)

    def preferred(self, gguf_name: str) -> str:
        """The type this tensor gets when its width allows."""
        parts = gguf_name.split(".")
        is_head = gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not self.has_output)
        if gguf_name == "position_embd.weight":  # llama-quantize leaves learned positions unquantized
            return self.file_type if not self.quantized else "F16"
        if len(parts) > 2 and parts[2].startswith("ffn_gate_inp"):  # MoE routers: F32, as convert_hf_to_gguf writes
            return "F32"  # them and llama-quantize keeps them (routing is sensitive and they are tiny)
        if is_head and self.output_type:
            return self.output_type
        if gguf_name == "token_embd.weight" and self.token_embd_type:
            return self.token_embd_type
        if not self.quantized:
            return self.file_type
        if is_head:
            return "Q8_0" if self.base == "Q8_0" else "Q6_K"
        # (ffn_down: also the experts' and shared experts' ffn_down_exps / ffn_down_shexp, as llama.cpp matches it)
        if self.file_type in MIXES and parts[0] == "blk" and (parts[2] == "attn_v" or parts[2].startswith("ffn_down")):
            if use_more_bits(int(parts[1]), self.n_layers):
                return "Q6_K"
        return self.base

    def tensor_type(self, gguf_name: str, shape: tuple[int, ...], want: str | None = None) -> tuple[str, str | None]:
        """(type, note): the type written for a tensor of ``shape`` (``want``: a rule's, else the plan's) and,
        when the width forced a different type, a note saying so.  1-D tensors are always F32."""
        if len(shape) == 1:
            return "F32", None
        want = want or self.preferred(gguf_name)
        got = want
        while got in BLOCK_TYPES and not BLOCK_TYPES[got].fits(shape[-1]):
            got = BLOCK_TYPES[got].fallback
        note = None if got == want else f"{gguf_name}: {shape[-1]} columns do not fit {want} blocks; written as {got}"
        return got, note

    def grid(self, gguf_name: str, shape: tuple[int, ...]) -> BlockType | None:
        """The grid a method quantizes this tensor on (None: it stays in float)."""
        t, _ = self.tensor_type(gguf_name, shape)
        return BLOCK_TYPES.get(t)
