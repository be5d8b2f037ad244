"""Quantization grids shared by every method.

A weight w in a group is represented as  w ~= scale * (q - zero) [+ offset]  with integer
q in [0, 2**bits - 1].  Uniform ("minmax") grids: symmetric ones fix zero at 2**(bits-1)
(the GPTQ convention), asymmetric ones fit [min, max] of the group; there is no offset.
GGUF block grids follow llama.cpp's types, some of which carry a float minimum (the
offset).  Scales and offsets are rounded to what will be stored *before* any code is
chosen, so what a method optimises is exactly what a format later writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class BlockType:
    """A GGUF block grid: ``bits``-bit codes, one scale (and, with ``has_min``, one minimum) per
    ``group`` columns.  K-quants quantize those per-group scales and minimums once more: to
    ``sub_bits``-bit integers against fp16 super-scales shared by ``super_block`` (256) columns.
    Legacy types store each group's scale (and minimum) directly in fp16."""

    bits: int
    group: int
    has_min: bool
    super_block: int = 0  # 0: a legacy type
    sub_bits: int = 0
    signed_sub: bool = False  # Q3_K/Q6_K: signed group scales

    @property
    def unit(self) -> int:
        """Columns a row must be a multiple of."""
        return self.super_block or self.group


GGUF_GRIDS: dict[str, BlockType] = {
    "q4_0": BlockType(4, 32, False), "q4_1": BlockType(4, 32, True),
    "q5_0": BlockType(5, 32, False), "q5_1": BlockType(5, 32, True),
    "q8_0": BlockType(8, 32, False),
    "q2_k": BlockType(2, 16, True, 256, 4), "q3_k": BlockType(3, 16, False, 256, 6, True),
    "q4_k": BlockType(4, 32, True, 256, 6), "q5_k": BlockType(5, 32, True, 256, 6),
    "q6_k": BlockType(6, 16, False, 256, 8, True),
}


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel)
    sym: bool = True
    scale_dtype: torch.dtype = torch.float16
    grid: str = "minmax"  # or a GGUF block type from GGUF_GRIDS

    def __post_init__(self) -> None:
        if self.grid != "minmax":
            bt = GGUF_GRIDS.get(self.grid)
            if bt is None or (bt.bits, bt.group) != (self.bits, self.group_size):
                raise ValueError(f"grid {self.grid!r} is not {self.bits}-bit codes in groups of {self.group_size}")
        elif self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group size must be -1 (per channel) or positive, got {self.group_size}")

    @staticmethod
    def for_gguf(grid: str) -> "QuantSpec":
        bt = GGUF_GRIDS[grid]
        return QuantSpec(bits=bt.bits, group_size=bt.group, sym=not bt.has_min, grid=grid)

    @property
    def block(self) -> BlockType | None:
        return GGUF_GRIDS.get(self.grid)

    @property
    def has_offsets(self) -> bool:
        return self.block is not None and self.block.has_min

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of groups along the input dimension (the last one may be partial)."""
        gs = self.effective_group_size(in_features)
        return -(-in_features // gs)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


@dataclass
class GridParams:
    """Per (row, group): w = scale * (q - zero) + offset (offset None: zero)."""

    scale: torch.Tensor
    zero: torch.Tensor
    offset: torch.Tensor | None = None

    def per_column(self, in_features: int, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(scale, zero, offset) of every column (out x in), for rounding whole matrices at once."""
        gs = spec.effective_group_size(in_features)

        def expand(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(gs, dim=1)[:, :in_features]

        return expand(self.scale), expand(self.zero), None if self.offset is None else expand(self.offset)


# ---- fitting ------------------------------------------------------------------------

def fit_params(w: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``w`` (rows x group columns), for grids whose groups are
    fitted independently and carry no offset (uniform grids, Q4_0/Q5_0/Q8_0).

    ``shrink`` (<= 1) narrows the range, as clipping searches do.  Returns fp32 scale
    (exactly representable in ``spec.scale_dtype``) and an integer-valued fp32 zero.
    """
    w = w.float()
    if spec.grid != "minmax":
        return _fit_legacy_sym(w * shrink, spec)
    wmin = w.amin(dim=1).clamp(max=0) * shrink
    wmax = w.amax(dim=1).clamp(min=0) * shrink
    if spec.sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    dead = (wmin == 0) & (wmax == 0)  # an all-zero group: any scale works, keep it finite
    wmin = torch.where(dead, -torch.ones_like(wmin), wmin)
    wmax = torch.where(dead, torch.ones_like(wmax), wmax)
    scale = (wmax - wmin) / spec.maxq
    finfo = torch.finfo(spec.scale_dtype)
    scale = scale.clamp(min=finfo.tiny, max=finfo.max).to(spec.scale_dtype).float()
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-wmin / scale).clamp(0, spec.maxq)
    return scale, zero


def _fit_legacy_sym(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    # Q4_0/Q5_0: d = m / -2**(bits-1), m the block's value of largest magnitude (sign kept), so
    # that value lands exactly on code 0.  Q8_0: d = max|w| / 127, codes q + 128, q in [-127, 127].
    half = 2 ** (spec.bits - 1)
    if spec.grid == "q8_0":
        d = w.abs().amax(dim=1) / 127
    else:
        idx = w.abs().argmax(dim=1, keepdim=True)
        d = w.gather(1, idx)[:, 0] / -half
    return d.to(torch.float16).float(), torch.full_like(d, half)


def fit_grid(W: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> GridParams:
    """The grid of a whole (out x in) matrix: (out x groups) parameters.

    ``importance`` (in,), e.g. diag(H) from calibration, weights the K-quants' range search as
    llama.cpp's importance matrix does; the other grids are fixed by each group's extremes."""
    out, n = W.shape
    gs, groups = spec.effective_group_size(n), spec.groups(n)
    W = W.float()
    bt = spec.block
    if bt is None or not (bt.has_min or bt.super_block):
        # Zero padding of a partial last group leaves its grid unchanged: these grids always span 0.
        wp = F.pad(W, (0, groups * gs - n)).reshape(out * groups, gs)
        scale, zero = fit_params(wp, spec)
        return GridParams(scale.reshape(out, groups), zero.reshape(out, groups))
    if n % bt.unit:
        raise ValueError(f"{spec.grid} needs rows that are a multiple of {bt.unit}, got {n}")
    x = W.reshape(out * groups, gs)
    if bt.super_block == 0:  # Q4_1/Q5_1: [min, max] of the block, d and min in fp16
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        d = ((hi - lo) / spec.maxq).to(torch.float16).float()
        return GridParams(d.reshape(out, groups), torch.zeros(out, groups, device=x.device), lo.to(torch.float16).float().reshape(out, groups))
    weights = _element_weights(x, spec.grid)
    if importance is not None:
        weights = weights * importance.float().to(x.device).clamp(min=0).reshape(groups, gs).repeat(out, 1)
    per_super = bt.super_block // gs
    if bt.has_min:
        # llama.cpp's search ranges: wider for Q4_K than for Q5_K/Q2_K
        rmin, nstep = (-1.0, 20) if spec.grid == "q4_k" else (-0.5, 15)
        a, m = _search_affine(x, weights, spec.maxq, nstep=nstep, rmin=rmin)
        scale = _quantize_sub(a.reshape(-1, per_super), bt.sub_bits, signed=False)
        mins = _quantize_sub(m.reshape(-1, per_super), bt.sub_bits, signed=False)
        return GridParams(scale.reshape(out, groups), torch.zeros(out, groups, device=x.device), (-mins).reshape(out, groups))
    half = 2 ** (spec.bits - 1)
    a = _search_signed(x, weights, half)
    scale = _quantize_sub(a.reshape(-1, per_super), bt.sub_bits, signed=True)
    return GridParams(scale.reshape(out, groups), torch.full((out, groups), float(half), device=x.device))


def _element_weights(x: torch.Tensor, grid: str) -> torch.Tensor:
    """How much each weight's error counts in the range search, as llama.cpp weighs it without
    an importance matrix: av + |x| (Q4_K/Q5_K; av the group's rms), |x| (Q2_K), x^2 (Q3_K/Q6_K)."""
    if grid in ("q4_k", "q5_k"):
        return x.pow(2).mean(dim=1, keepdim=True).sqrt() + x.abs()
    if grid == "q2_k":
        return x.abs()
    return x.pow(2)


def _search_affine(x: torch.Tensor, wt: torch.Tensor, maxq: int, nstep: int = 20, rmin: float = -1.0,
                   rdelta: float = 0.1, chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: scale a >= 0 and minimum m >= 0 with x ~= a*q - m, q in [0, maxq], minimising the
    weighted squared error.  Candidate codes come from stretched [min, max] ranges; for each,
    (a, m) is the weighted least-squares fit (the idea of llama.cpp's make_qkx2_quants)."""
    if x.shape[0] > chunk:  # rows are independent: bound the temporaries
        parts = [_search_affine(xc, wc, maxq, nstep, rmin, rdelta, chunk) for xc, wc in zip(x.split(chunk), wt.split(chunk))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    lo = x.amin(dim=1).clamp(max=0)
    hi = x.amax(dim=1)
    live = hi > lo
    sw, sx, sx2 = wt.sum(dim=1), (wt * x).sum(dim=1), (wt * x * x).sum(dim=1)
    # the plain [min, max] grid is the first candidate
    a_best = torch.where(live, (hi - lo) / maxq, torch.zeros_like(lo))
    b_best = lo.clone()
    e_best = torch.full_like(lo, float("inf"))
    for i in range(-1, nstep + 1):
        if i < 0:
            a, b = a_best, b_best
            L = torch.round((x - lo[:, None]) / torch.where(live, a, torch.ones_like(a))[:, None]).clamp_(0, maxq)
        else:
            # Each candidate stretches the range from the best offset found so far (as llama.cpp's
            # loop does: it updates its minimum as it goes, which measurably helps).
            rng = torch.where(live & (hi > b_best), hi - b_best, torch.ones_like(hi))
            L = torch.round((x - b_best[:, None]) * ((rmin + rdelta * i + maxq) / rng)[:, None]).clamp_(0, maxq)
        wL = wt * L
        sl, sl2, sxl = wL.sum(dim=1), (wL * L).sum(dim=1), (wL * x).sum(dim=1)
        if i >= 0:
            D = sw * sl2 - sl * sl
            ok = D > 0
            Dsafe = torch.where(ok, D, torch.ones_like(D))
            a = (sw * sxl - sx * sl) / Dsafe
            b = (sl2 * sx - sl * sxl) / Dsafe
            pos = b > 0  # the minimum must not be positive (m >= 0): refit the scale alone
            a = torch.where(pos, sxl / sl2.clamp(min=1e-30), a)
            b = torch.where(pos, torch.zeros_like(b), b)
        else:
            ok = torch.ones_like(live)
        # sum w (aL + b - x)^2, expanded into the sums at hand
        e = a * a * sl2 + 2 * a * b * sl + b * b * sw - 2 * a * sxl - 2 * b * sx + sx2
        better = live & ok & (a > 0) & (e < e_best)
        a_best, b_best, e_best = torch.where(better, a, a_best), torch.where(better, b, b_best), torch.where(better, e, e_best)
    return a_best, -b_best


def _search_signed(x: torch.Tensor, wt: torch.Tensor, half: int, nstep: int = 9, rdelta: float = 0.1,
                   chunk: int = 1 << 16) -> torch.Tensor:
    """Per row: signed scale a with x ~= a*(q - half), codes in [0, 2*half), minimising the weighted
    squared error over candidates around d = m / -half (m the value of largest magnitude), each
    refitted by least squares (the idea of llama.cpp's make_qx_quants)."""
    if x.shape[0] > chunk:
        return torch.cat([_search_signed(xc, wc, half, nstep, rdelta, chunk) for xc, wc in zip(x.split(chunk), wt.split(chunk))])
    m = x.gather(1, x.abs().argmax(dim=1, keepdim=True))[:, 0]
    live = m != 0
    msafe = torch.where(live, m, torch.ones_like(m))
    sx2 = (wt * x * x).sum(dim=1)
    a_best = torch.where(live, m / -half, torch.zeros_like(m))
    e_best = torch.full_like(m, float("inf"))
    for i in range(-nstep - 1, nstep + 1):
        if i < -nstep:  # the plain d = m / -half grid first
            a = a_best
            L = torch.round(x / torch.where(live, a, torch.ones_like(a))[:, None]).clamp_(-half, half - 1)
        else:
            L = torch.round(x * (-(half + rdelta * i) / msafe)[:, None]).clamp_(-half, half - 1)
        wL = wt * L
        sl2, sxl = (wL * L).sum(dim=1), (wL * x).sum(dim=1)
        if i >= -nstep:
            a = sxl / sl2.clamp(min=1e-30)
        e = a * a * sl2 - 2 * a * sxl + sx2
        better = live & (sl2 > 0) & (e < e_best)
        a_best, e_best = torch.where(better, a, a_best), torch.where(better, e, e_best)
    return a_best


def _sub_integers(v: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K-quant group values (rows = super-blocks) as (fp16 super-scale d, ``bits``-bit integers k).

    Unsigned: d = max / (2**bits - 1).  Signed: d = v* / -2**(bits-1) with v* the value of
    largest magnitude, so it lands on the most negative integer.  d is returned as fp32 holding
    an fp16 value; k is 0 wherever d is."""
    if signed:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        end, top = lo, v.gather(1, v.abs().argmax(dim=1, keepdim=True))
    else:
        lo, hi = 0, 2**bits - 1
        end, top = hi, v.amax(dim=1, keepdim=True).clamp(min=0)
    d = (top / end).to(torch.float16)
    # Among fp16 subnormals (super-blocks of tiny weights) rounding d to nearest can move the largest
    # value off the end of the integer range; d is then one fp16 step nearer 0, so the packer, which
    # reads d back from that value, finds the same d.
    off = (d != 0) & (torch.round(top / d.float()) != end)
    d = torch.where(off, torch.nextafter(d, torch.zeros_like(d)), d).float()
    k = torch.clamp(torch.round(v / torch.where(d == 0, torch.ones_like(d), d)), lo, hi)
    return d, torch.where(d == 0, torch.zeros_like(k), k)


def _quantize_sub(v: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """K-quant group values rounded to d * integer (see _sub_integers), in fp32: exactly what
    llama.cpp computes from the stored d and integer."""
    d, k = _sub_integers(v, bits, signed)
    return d * k


def split_sub(values: torch.Tensor, bt: BlockType, signed: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of _quantize_sub for packing: (fp16 d per super-block, integers per group).

    ``values``: (super-blocks, groups per super-block).  Raises ValueError if the values are not
    d * integer for one fp16 d (the tensor was not quantized on this grid)."""
    v = values.float()
    d, k = _sub_integers(v, bt.sub_bits, bt.signed_sub if signed is None else signed)
    if not torch.equal(d * k, v):
        raise ValueError("group scales are not on the K-quant grid (fp16 super-scale x integer)")
    return d.to(torch.float16), k.to(torch.int16)


def gguf_reference_codes(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes exactly as llama.cpp's reference quantizer picks them for the legacy types (rows are blocks).

    It rounds against the fp32 d (and min) and stores them in fp16, so RTN GGUF files are
    byte-identical to llama-quantize's; the error-feedback methods instead round on the stored grid."""
    w = w.float()
    half = 2 ** (spec.bits - 1)
    if spec.grid == "q8_0":
        d = w.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        x = w * inv
        q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # round half away from zero, as roundf
        return q + 128
    if spec.grid in ("q4_1", "q5_1"):
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        d = (hi - lo) / spec.maxq
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        return torch.trunc((w - lo) * inv + 0.5).clamp(0, spec.maxq)
    idx = w.abs().argmax(dim=1, keepdim=True)
    d = w.gather(1, idx) / -half
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.trunc(w * inv + (half + 0.5)).clamp(0, 2 * half - 1)


# ---- codes ---------------------------------------------------------------------------

def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
             offset: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (as float) of ``w`` on the grid; parameters broadcast against w.

    A zero scale (an all-zero block) maps everything to the zero point."""
    if offset is not None:
        w = w - offset
    return torch.clamp(torch.round(torch.nan_to_num(w / scale, nan=0.0, posinf=0.0, neginf=0.0)) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    # The operation order matters: it is llama.cpp's (d * q + m), so values match its bit for bit.
    w = scale * (q - zero)
    return w if offset is None else w + offset


def group_index(in_features: int, spec: QuantSpec) -> torch.Tensor:
    """g_idx for the natural (static) column order: column j belongs to group j // gs."""
    return (torch.arange(in_features) // spec.effective_group_size(in_features)).to(torch.int32)
