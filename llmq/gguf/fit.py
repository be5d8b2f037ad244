"""How llama.cpp's block grids are fitted: the per-block scale (and minimum) of the legacy types,
the K-quants' searched group scales quantized against fp16 super-scales, and llama.cpp's own
rounding rule for the legacy types.  Pure tensor math on rows of blocks; the type records in
types.py say which rule each type uses.
"""

from __future__ import annotations

import torch


# ---- legacy types (blocks of 32, fp16 scale and maybe an fp16 minimum) --------------------

def fit_absmax(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: d = m / -2**(bits-1), m the block's value of largest magnitude (sign kept), so that
    value lands exactly on code 0.  Q8_0: d = max|w| / 127, codes q + 128 with q in [-127, 127].
    Rows are blocks; returns (fp32 d holding an fp16 value, zero point)."""
    half = 2 ** (bits - 1)
    if bits == 8:
        d = x.abs().amax(dim=1) / 127
    else:
        idx = x.abs().argmax(dim=1, keepdim=True)
        d = x.gather(1, idx)[:, 0] / -half
    return d.to(torch.float16).float(), torch.full_like(d, half)


def fit_minmax(x: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: the block's [min, max], d and min in fp16.  Returns (d, min)."""
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    return ((hi - lo) / maxq).to(torch.float16).float(), lo.to(torch.float16).float()


def reference_codes(w: torch.Tensor, bits: int, has_min: bool) -> torch.Tensor:
    """Codes exactly as llama.cpp's reference quantizer picks them for the legacy types (rows are blocks).

    It rounds against the fp32 d (and min) and stores them in fp16, so RTN GGUF files are
    byte-identical to llama-quantize's; the error-feedback methods instead round on the stored grid."""
    w = w.float()
    half = 2 ** (bits - 1)
    maxq = 2**bits - 1
    if bits == 8:
        d = w.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        x = w * inv
        q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # round half away from zero, as roundf
        return q + 128
    if has_min:
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        d = (hi - lo) / maxq
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        return torch.trunc((w - lo) * inv + 0.5).clamp(0, maxq)
    idx = w.abs().argmax(dim=1, keepdim=True)
    d = w.gather(1, idx) / -half
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.trunc(w * inv + (half + 0.5)).clamp(0, 2 * half - 1)


# ---- K-quants (super-blocks of 256, group scales quantized against fp16 super-scales) ------

def element_weights(x: torch.Tensor, kind: str) -> torch.Tensor:
    """How much each weight's error counts in the range search, as llama.cpp weighs it without
    an importance matrix: av + |x| ('rms+abs': Q4_K/Q5_K; av the group's rms), |x| ('abs': Q2_K),
    x^2 ('square': Q3_K/Q6_K)."""
    if kind == "rms+abs":
        return x.pow(2).mean(dim=1, keepdim=True).sqrt() + x.abs()
    if kind == "abs":
        return x.abs()
    return x.pow(2)


def search_affine(x: torch.Tensor, wt: torch.Tensor, maxq: int, nstep: int = 20, rmin: float = -1.0,
                  rdelta: float = 0.1, chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: scale a >= 0 and minimum m >= 0 with x ~= a*q - m, q in [0, maxq], minimising the
    weighted squared error.  Candidate codes come from stretched [min, max] ranges; for each,
    (a, m) is the weighted least-squares fit (the idea of llama.cpp's make_qkx2_quants)."""
    if x.shape[0] > chunk:  # rows are independent: bound the temporaries
        parts = [search_affine(xc, wc, maxq, nstep, rmin, rdelta, chunk) for xc, wc in zip(x.split(chunk), wt.split(chunk))]
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


def search_signed(x: torch.Tensor, wt: torch.Tensor, half: int, nstep: int = 9, rdelta: float = 0.1,
                  chunk: int = 1 << 16) -> torch.Tensor:
    """Per row: signed scale a with x ~= a*(q - half), codes in [0, 2*half), minimising the weighted
    squared error over candidates around d = m / -half (m the value of largest magnitude), each
    refitted by least squares (the idea of llama.cpp's make_qx_quants)."""
    if x.shape[0] > chunk:
        return torch.cat([search_signed(xc, wc, half, nstep, rdelta, chunk) for xc, wc in zip(x.split(chunk), wt.split(chunk))])
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


def sub_integers(v: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


def quantize_sub(v: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """K-quant group values rounded to d * integer (see sub_integers), in fp32: exactly what
    llama.cpp computes from the stored d and integer."""
    d, k = sub_integers(v, bits, signed)
    return d * k


def split_sub(values: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of quantize_sub for packing: (fp16 d per super-block, integers per group).

    ``values``: (super-blocks, groups per super-block).  Raises ValueError if the values are not
    d * integer for one fp16 d (the tensor was not quantized on this grid)."""
    v = values.float()
    d, k = sub_integers(v, bits, signed)
    if not torch.equal(d * k, v):
        raise ValueError("group scales are not on the K-quant grid (fp16 super-scale x integer)")
    return d.to(torch.float16), k.to(torch.int16)
