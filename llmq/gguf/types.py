"""llama.cpp's tensor types, one record each: what a block stores, how it is fitted, packed and unpacked.

Block types are grids (llmq.grid.Grid), so every method quantizes on them directly:
  legacy  Q4_0 Q4_1 Q5_0 Q5_1 Q8_0   blocks of 32 values with an fp16 scale (and, _1, an fp16 minimum)
  K-quant Q2_K Q3_K Q4_K Q5_K Q6_K   super-blocks of 256 whose 16- or 32-value groups have 4/6/8-bit
                                     scales (and minimums) against fp16 super-scales
Layouts are llama.cpp's block structs (ggml-common.h), byte for byte.  A row whose width a type
cannot hold falls back to llama.cpp's substitute (``fallback``).  Float types F32/F16/BF16 only
encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmq.errors import LlmqError
from llmq.grid import Grid, GridParams, group_index
from llmq.gguf import fit
from llmq.qtensor import QuantizedTensor


@dataclass(frozen=True)
class FloatType:
    type_name: str
    np_dtype: str  # numpy dtype of the stored values ("" for BF16, which numpy lacks)

    def encode(self, t: torch.Tensor) -> np.ndarray:
        if self.type_name == "BF16":  # numpy has no bfloat16: gguf's encoder gives its bytes
            from gguf.quants import quantize

            return quantize(t.float().numpy(), self.ggml_type)
        return t.float().numpy().astype(self.np_dtype)

    @property
    def ggml_type(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.type_name]

    @property
    def itemsize(self) -> int:
        return 4 if self.type_name == "F32" else 2


@dataclass(frozen=True)
class BlockType(Grid):
    type_name: str
    bits: int
    group_size: int
    has_min: bool
    fallback: str  # llama.cpp's substitute for rows this type cannot hold
    super_block: int = 0  # 0: a legacy type
    sub_bits: int = 0  # K-quants: bits of each group's scale (and minimum)
    static = True  # parameters are fixed from the whole matrix before codes are chosen

    @property
    def name(self) -> str:
        return self.type_name

    @property
    def sym(self) -> bool:  # type: ignore[override]
        return not self.has_min

    @property
    def has_offsets(self) -> bool:
        return self.has_min

    @property
    def unit(self) -> int:
        """Columns a row must be a multiple of."""
        return self.super_block or self.group_size

    def fits(self, in_features: int) -> bool:
        return in_features % self.unit == 0

    @property
    def ggml_type(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.type_name]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(shape)) // block * size

    def _blocks(self, W: torch.Tensor) -> torch.Tensor:
        if not self.fits(W.shape[1]):
            raise ValueError(f"{self.type_name} needs rows that are a multiple of {self.unit}, got {W.shape[1]}")
        return W.float().reshape(-1, self.group_size)

    def pack(self, qt: QuantizedTensor) -> np.ndarray:
        """The raw blocks of an (out x in) tensor quantized on this type: uint8 (out, bytes per row)."""
        raise NotImplementedError

    def unpack(self, blocks: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        """The inverse of pack."""
        raise NotImplementedError

    def _tensor(self, shape, codes, scale, zero, offset=None) -> QuantizedTensor:
        out, inp = shape
        rs = lambda t: torch.as_tensor(t).float().reshape(out, -1)  # noqa: E731
        return QuantizedTensor(codes=torch.as_tensor(codes).to(torch.uint8).reshape(out, inp), scales=rs(scale),
                               zeros=torch.as_tensor(zero).to(torch.uint8).reshape(out, -1), g_idx=group_index(inp, self),
                               grid=self, offsets=None if offset is None else rs(offset))


# ---- byte helpers ---------------------------------------------------------------------

def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.float().numpy().astype(np.float16).view(np.uint8).reshape(x.shape[0], 2)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[:, 0]


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit fields of 128 values per row -> 32 bytes: value j*32 + l in bits 2j of byte l."""
    q = q.reshape(q.shape[0], 4, 32)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def _uncrumbs(b: np.ndarray) -> np.ndarray:
    return np.stack([(b >> (2 * j)) & 3 for j in range(4)], axis=1).reshape(b.shape[0], 128)


def _bitplane(bits: np.ndarray) -> np.ndarray:
    """One bit of 256 values per row -> 32 bytes: value b*32 + l in bit b of byte l."""
    bits = bits.reshape(bits.shape[0], 8, 32).astype(np.uint8)
    return np.bitwise_or.reduce(bits << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)


def _unbitplane(b: np.ndarray) -> np.ndarray:
    return np.stack([(b >> j) & 1 for j in range(8)], axis=1).reshape(b.shape[0], 256)


# ---- legacy types ---------------------------------------------------------------------

@dataclass(frozen=True)
class LegacyType(BlockType):
    """32 values with an fp16 scale d (and, with has_min, an fp16 minimum m): w = d * (q - zero) + m."""

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GridParams:
        out = W.shape[0]
        x = self._blocks(W)
        if self.has_min:
            d, m = fit.fit_minmax(x, self.maxq)
            return GridParams(d.reshape(out, -1), torch.zeros_like(d).reshape(out, -1), m.reshape(out, -1))
        d, zero = fit.fit_absmax(x, self.bits)
        return GridParams(d.reshape(out, -1), zero.reshape(out, -1))

    def codes(self, W: torch.Tensor, params: GridParams) -> torch.Tensor:
        # llama.cpp's own rounding, so RTN files match llama-quantize byte for byte
        return fit.reference_codes(self._blocks(W), self.bits, self.has_min).reshape(W.shape)

    def pack(self, qt: QuantizedTensor) -> np.ndarray:
        out = qt.shape[0]
        q = qt.codes.reshape(-1, 32).numpy().astype(np.uint8)
        d = _f16_bytes(qt.scales.reshape(-1))
        m = [_f16_bytes(qt.offsets.reshape(-1))] if self.has_min else []
        if self.bits == 8:
            body = [(q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
        elif self.bits == 4:
            body = [_nibbles(q[:, :16], q[:, 16:])]  # byte j: value j (low nibble), value j+16 (high)
        else:  # 5 bits: the 5th bits as one little-endian 32-bit word, then the low nibbles
            body = [np.packbits((q >> 4) & 1, axis=-1, bitorder="little"), _nibbles(q[:, :16], q[:, 16:])]
        return np.concatenate([d, *m, *body], axis=1).reshape(out, -1)

    def unpack(self, blocks: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        b = np.ascontiguousarray(blocks).reshape(-1, 2 + (2 if self.has_min else 0) + 32 * self.bits // 8)
        d = _f16(b[:, :2])
        m = _f16(b[:, 2:4]) if self.has_min else None
        body = b[:, 4 if self.has_min else 2:]
        if self.bits == 8:
            q = body.view(np.int8).astype(np.int16) + 128
        else:
            lo = np.concatenate([body[:, -16:] & 0x0F, body[:, -16:] >> 4], axis=1)
            q = lo if self.bits == 4 else lo | (np.unpackbits(body[:, :4], axis=-1, bitorder="little") << 4)
        zero = np.zeros_like(d) if self.has_min else np.full_like(d, 2 ** (self.bits - 1))
        return self._tensor(shape, q, d, zero, m)


# ---- K-quants -------------------------------------------------------------------------

@dataclass(frozen=True)
class KQuantType(BlockType):
    """Groups of 16 or 32 values; each group's scale (and minimum) is a sub_bits-bit integer times an
    fp16 super-scale shared by the 256 values of a super-block.  Signed types (no minimum) store
    w = d*k * (q - 2**(bits-1)); the others w = d*k * q - dmin*km."""

    search: str = "square"  # how llama.cpp weighs errors in the scale search (fit.element_weights)
    search_range: tuple[float, int] = (-0.5, 15)  # (rmin, steps) of the affine search

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GridParams:
        """Each group's scale (and minimum) by weighted least squares over stretched ranges (llama.cpp's
        idea; ``importance`` multiplies the weights, as an importance matrix does), then quantized
        against the super-block's fp16 scales."""
        out, n = W.shape
        groups = n // self.group_size
        x = self._blocks(W)
        weights = fit.element_weights(x, self.search)
        if importance is not None:
            weights = weights * importance.float().to(x.device).clamp(min=0).reshape(groups, self.group_size).repeat(out, 1)
        per_super = self.super_block // self.group_size
        if self.has_min:
            rmin, nstep = self.search_range
            a, m = fit.search_affine(x, weights, self.maxq, nstep=nstep, rmin=rmin)
            scale = fit.quantize_sub(a.reshape(-1, per_super), self.sub_bits, signed=False)
            mins = fit.quantize_sub(m.reshape(-1, per_super), self.sub_bits, signed=False)
            return GridParams(scale.reshape(out, groups), torch.zeros(out, groups, device=x.device), (-mins).reshape(out, groups))
        half = 2 ** (self.bits - 1)
        a = fit.search_signed(x, weights, half)
        scale = fit.quantize_sub(a.reshape(-1, per_super), self.sub_bits, signed=True)
        return GridParams(scale.reshape(out, groups), torch.full((out, groups), float(half), device=x.device))

    def split(self, qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, int]:
        """(codes per super-block, fp16 d bytes, integer scales, [dmin bytes, integer minimums], super-blocks)."""
        out, inp = qt.shape
        nsup = out * inp // 256
        per = 256 // self.group_size
        try:
            d, k = fit.split_sub(qt.scales.reshape(nsup, per), self.sub_bits, signed=not self.has_min)
            dmin = km = None
            if self.has_min:
                dmin, km = fit.split_sub(-qt.offsets.reshape(nsup, per), self.sub_bits, signed=False)
        except ValueError as e:
            raise LlmqError(f"cannot pack {self.type_name}: {e}") from None
        q = qt.codes.reshape(nsup, 256).numpy().astype(np.uint8)
        return (q, _f16_bytes(d.reshape(-1)), k.numpy(), None if dmin is None else _f16_bytes(dmin.reshape(-1)),
                None if km is None else km.numpy())

    def _from_parts(self, shape, q, d, k, dmin=None, km=None) -> QuantizedTensor:
        """The QuantizedTensor of unpacked super-blocks: d (nsup,), k/km (nsup, groups per super-block)."""
        scale = d[:, None] * k.astype(np.float32)
        if self.has_min:
            return self._tensor(shape, q, scale, np.zeros_like(scale), -(dmin[:, None] * km.astype(np.float32)))
        return self._tensor(shape, q, scale, np.full_like(scale, 2 ** (self.bits - 1)))


@dataclass(frozen=True)
class Q45K(KQuantType):
    """Q4_K / Q5_K: d, dmin, 12 bytes of 6-bit scales and minimums for 8 groups of 32, (Q5_K: one bit plane
    of 5th bits), 128 bytes of low nibbles."""

    def pack(self, qt: QuantizedTensor) -> np.ndarray:
        q, d, k, dmin, km = self.split(qt)
        sc, mn = k.astype(np.uint8), km.astype(np.uint8)
        scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                                 _nibbles(sc[:, 4:], mn[:, 4:])], axis=1)
        chunks = q.reshape(q.shape[0], 4, 2, 32)  # 64 values per chunk: the first 32 low nibbles, the next 32 high
        qs = _nibbles(chunks[:, :, 0], chunks[:, :, 1]).reshape(q.shape[0], 128)
        qh = [_bitplane(q >> 4)] if self.bits == 5 else []
        return np.concatenate([d, dmin, scales, *qh, qs], axis=1).reshape(qt.shape[0], -1)

    def unpack(self, blocks: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        b = np.ascontiguousarray(blocks).reshape(-1, 16 + (32 if self.bits == 5 else 0) + 128)
        s = b[:, 4:16]
        sc = np.concatenate([s[:, :4] & 63, (s[:, 8:] & 0x0F) | ((s[:, :4] >> 6) << 4)], axis=1)
        mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
        qs = b[:, -128:].reshape(-1, 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 256)
        if self.bits == 5:
            q = q | (_unbitplane(b[:, 16:48]) << 4)
        return self._from_parts(shape, q, _f16(b[:, :2]), sc, _f16(b[:, 2:4]), mn)


@dataclass(frozen=True)
class Q6K(KQuantType):
    """Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed 8-bit scales, d."""

    def pack(self, qt: QuantizedTensor) -> np.ndarray:
        q, d, k, _, _ = self.split(qt)
        halves = q.reshape(q.shape[0], 2, 2, 64)  # per 128 values: low nibbles of the first 64, then of the next 64
        ql = _nibbles(halves[:, :, 0], halves[:, :, 1]).reshape(q.shape[0], 128)
        qh = np.concatenate([_crumbs(q[:, :128] >> 4), _crumbs(q[:, 128:] >> 4)], axis=1)
        return np.concatenate([ql, qh, k.astype(np.int8).view(np.uint8), d], axis=1).reshape(qt.shape[0], -1)

    def unpack(self, blocks: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        b = np.ascontiguousarray(blocks).reshape(-1, 210)
        ql = b[:, :128].reshape(-1, 2, 64)
        low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 256)
        high = np.concatenate([_uncrumbs(b[:, 128:160]), _uncrumbs(b[:, 160:192])], axis=1)
        return self._from_parts(shape, low | (high << 4), _f16(b[:, 208:210]), b[:, 192:208].view(np.int8))


@dataclass(frozen=True)
class Q3K(KQuantType):
    """Q3_K: one bit plane of 3rd bits, 64 bytes of low 2-bit pairs, 16 6-bit scales (bias 32) in 12 bytes, d."""

    def pack(self, qt: QuantizedTensor) -> np.ndarray:
        q, d, k, _, _ = self.split(qt)
        s = (k + 32).astype(np.uint8)  # 6-bit scales, stored with a bias of 32
        low = _nibbles(s[:, :8], s[:, 8:])
        high = (s >> 4) & 3
        high = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
        qs = np.concatenate([_crumbs(q[:, :128] & 3), _crumbs(q[:, 128:] & 3)], axis=1)
        return np.concatenate([_bitplane(q >> 2), qs, low, high, d], axis=1).reshape(qt.shape[0], -1)

    def unpack(self, blocks: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        b = np.ascontiguousarray(blocks).reshape(-1, 110)
        q = np.concatenate([_uncrumbs(b[:, 32:64]), _uncrumbs(b[:, 64:96])], axis=1) | (_unbitplane(b[:, :32]) << 2)
        low, high = b[:, 96:104], b[:, 104:108]
        hi = np.concatenate([(high >> (2 * j)) & 3 for j in range(4)], axis=1)  # scales 0-3, 4-7, 8-11, 12-15
        s = np.concatenate([low & 0x0F, low >> 4], axis=1) | (hi << 4)
        return self._from_parts(shape, q, _f16(b[:, 108:110]), s.astype(np.int16) - 32)


@dataclass(frozen=True)
class Q2K(KQuantType):
    """Q2_K: 16 bytes of 4-bit scale/minimum pairs, 64 bytes of 2-bit codes, d, dmin."""

    def pack(self, qt: QuantizedTensor) -> np.ndarray:
        q, d, k, dmin, km = self.split(qt)
        scales = _nibbles(k.astype(np.uint8), km.astype(np.uint8))
        qs = np.concatenate([_crumbs(q[:, :128]), _crumbs(q[:, 128:])], axis=1)
        return np.concatenate([scales, qs, d, dmin], axis=1).reshape(qt.shape[0], -1)

    def unpack(self, blocks: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        b = np.ascontiguousarray(blocks).reshape(-1, 84)
        q = np.concatenate([_uncrumbs(b[:, 16:48]), _uncrumbs(b[:, 48:80])], axis=1)
        return self._from_parts(shape, q, _f16(b[:, 80:82]), b[:, :16] & 0x0F, _f16(b[:, 82:84]), b[:, :16] >> 4)


# ---- the records ----------------------------------------------------------------------

BLOCK_TYPES: dict[str, BlockType] = {t.type_name: t for t in (
    LegacyType("Q4_0", 4, 32, False, fallback="F16"), LegacyType("Q4_1", 4, 32, True, fallback="F16"),
    LegacyType("Q5_0", 5, 32, False, fallback="F16"), LegacyType("Q5_1", 5, 32, True, fallback="F16"),
    LegacyType("Q8_0", 8, 32, False, fallback="F16"),
    # (K-quant fallbacks: llama.cpp's substitutes of about the same size for rows not a multiple of 256)
    Q2K("Q2_K", 2, 16, True, fallback="Q4_0", super_block=256, sub_bits=4, search="abs"),
    Q3K("Q3_K", 3, 16, False, fallback="Q4_0", super_block=256, sub_bits=6),
    # llama.cpp's search range is wider for Q4_K than for Q5_K/Q2_K
    Q45K("Q4_K", 4, 32, True, fallback="Q5_0", super_block=256, sub_bits=6, search="rms+abs", search_range=(-1.0, 20)),
    Q45K("Q5_K", 5, 32, True, fallback="Q5_1", super_block=256, sub_bits=6, search="rms+abs"),
    Q6K("Q6_K", 6, 16, False, fallback="Q8_0", super_block=256, sub_bits=8),
)}
FLOAT_TYPES: dict[str, FloatType] = {t.type_name: t for t in (FloatType("F32", "float32"), FloatType("F16", "float16"),
                                                              FloatType("BF16", ""))}
MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}  # llama.cpp's _M mixes -> their base type
GGUF_TYPES = (*BLOCK_TYPES, *MIXES, *FLOAT_TYPES)  # what --gguf-type takes
# What bit allocation chooses among (the K-quants and Q8_0), and for rows K-quants cannot hold
# (not a multiple of 256) the legacy types.
ALLOCATION_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
NARROW_ALLOCATION_TYPES = ("Q4_0", "Q5_0", "Q8_0")


def check_type(name: str | None, flag: str = "--gguf-type", mixes: bool = True) -> str:
    """A type name as the user typed it, upper-cased and checked."""
    t = (name or "").upper()
    allowed = GGUF_TYPES if mixes else (*BLOCK_TYPES, *FLOAT_TYPES)
    if t not in allowed:
        raise LlmqError(f"{flag} must be one of {', '.join(allowed)}, got {name!r}")
    return t
