"""Which GGUF type each tensor of a model gets.

A `--gguf-type` is either one block type for every decoder linear (Q4_0 ... Q6_K), a mix in the
spirit of llama.cpp's (Q4_K_M / Q5_K_M: attn_v and ffn_down of some layers at Q6_K), or a float
type.  As llama-quantize does, quantized files also store the token embedding at the base type
and the output head at Q6_K; norms stay F32.  A row length a type cannot hold (K-quants need
multiples of 256, the legacy types multiples of 32) falls back to the nearest type that fits,
and the user is told.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from llmq.grid import GGUF_GRIDS, QuantSpec

FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = tuple(g.upper() for g in GGUF_GRIDS)  # Q4_0 ... Q6_K
MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}  # mix -> its base type
GGUF_TYPES = (*BLOCK_TYPES, *MIXES, *FLOAT_TYPES)
# K-quants on rows that are not a multiple of 256: llama.cpp's substitutes of about the same size.
K_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# model_type -> gguf's architecture name.  q/k rows are permuted only for the Llama family, whose
# llama.cpp graph expects the rotary layout of the original Meta checkpoints.
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "phi": "phi2",
              "gpt_neox": "gptneox", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt2": "gpt2",
              "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
PERMUTE_QK = ("llama", "mistral", "mixtral")
# Gemma's RMSNorms scale by (1 + w); llama.cpp's graph multiplies by the stored weight, so norms are written as 1 + w.
NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3_text")


def gguf_config(source) -> dict[str, Any]:
    """A model's config as transformers reads it: legacy spellings (rope_theta, rope_scaling, Gemma 3's
    rope_local_base_freq and sliding_window_pattern) arrive as today's rope_parameters and layer_types,
    whichever transformers version wrote config.json, and sizes a family names its own way (GPT-2's
    n_embd, ...) also under the common names, through the config's attribute_map."""
    c = source.config
    cfg = c.to_dict()
    cfg.update({name: getattr(c, name) for name in c.attribute_map})
    if cfg.get("model_type") == "gpt2":  # sizes that attribute_map leaves out
        cfg.update(intermediate_size=c.n_inner or 4 * c.n_embd, layer_norm_eps=c.layer_norm_epsilon)
    return cfg


def check_gguf_type(name: str, flag: str = "--gguf-type", mixes: bool = True) -> str:
    from llmq.errors import LlmqError

    t = (name or "").upper()
    allowed = GGUF_TYPES if mixes else (*BLOCK_TYPES, *FLOAT_TYPES)
    if t not in allowed:
        raise LlmqError(f"{flag} must be one of {', '.join(allowed)}, got {name!r}")
    return t


# One expert's projection in a checkpoint (model.layers.3.mlp.experts.17.up_proj.weight); llama.cpp
# holds all experts of a projection in one 3-D tensor (blk.3.ffn_up_exps.weight), expert-major.
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")


def expert_index(key: str) -> tuple[str, int] | None:
    """(the key of the stacked tensor, the expert's index) for a per-expert checkpoint key, else None."""
    m = _EXPERT_KEY.match(key)
    return (f"{m[1]}.{m[3]}", int(m[2])) if m else None


def expert_counts(config: dict[str, Any]) -> tuple[int, int]:
    """(routed experts per layer, experts used per token); (0, 0) for a dense model."""
    n = int(config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0)
    return (n, int(config["num_experts_per_tok"])) if n else (0, 0)


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
    file_type: str  # one of GGUF_TYPES
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

    def tensor_type(self, gguf_name: str, shape: tuple[int, ...]) -> tuple[str, str | None]:
        """(type, note): the type written for a tensor of ``shape`` and, when the width forced
        a different type than preferred, a note saying so.  1-D tensors are always F32."""
        if len(shape) == 1:
            return "F32", None
        want = self.preferred(gguf_name)
        if want in FLOAT_TYPES:
            return want, None
        width = shape[-1]
        got = want
        if width % GGUF_GRIDS[got.lower()].unit:
            got = K_FALLBACK.get(got, got)
            if width % GGUF_GRIDS[got.lower()].unit:
                got = "F16"
        note = None if got == want else f"{gguf_name}: {width} columns do not fit {want} blocks; written as {got}"
        return got, note

    def spec(self, gguf_name: str, shape: tuple[int, ...]) -> QuantSpec | None:
        """The grid a method quantizes this tensor on (None: it stays in float)."""
        t, _ = self.tensor_type(gguf_name, shape)
        return QuantSpec.for_gguf(t.lower()) if t.lower() in GGUF_GRIDS else None


def linear_grids(config: dict[str, Any], gguf_type: str) -> Callable[[str, tuple[int, ...]], QuantSpec | None]:
    """For the quantize run of a GGUF file: checkpoint key and shape of a decoder linear -> the grid
    the method quantizes it on (None: no GGUF type holds it, it stays in float)."""
    plan = GGUFPlan(gguf_type.upper(), config["num_hidden_layers"])
    namer = tensor_namer(config)

    def grid(key: str, shape: tuple[int, ...]) -> QuantSpec | None:
        name = namer(key)
        return plan.spec(name, shape) if name else None

    return grid
