"""Bit packing of small integer codes into int32 words.

Codes are laid out as one little-endian bit stream along the packed dimension: code i
occupies bits [i*bits, (i+1)*bits) of the concatenated words.  For 2/4/8 bits this is
the familiar "k codes per int32, lowest first"; for 3 bits a code may straddle two
words, exactly as GPTQ's 3-bit layout (32 codes in 3 words).  A dimension that does
not fill the last word is zero-padded.
"""

from __future__ import annotations

import torch


def packed_len(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes (any int dtype, values < 2**bits) along ``dim`` into int32."""
    x = codes.movedim(dim, 0).to(torch.int64)
    n = x.shape[0]
    pad = (-n) % 32  # 32 codes always fill exactly `bits` words
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    x = x.reshape(-1, 32, *x.shape[1:])
    words = torch.zeros((x.shape[0], bits, *x.shape[2:]), dtype=torch.int64)
    for j in range(32):
        off = j * bits
        w, s = divmod(off, 32)
        words[:, w] |= (x[:, j] << s) & 0xFFFFFFFF
        if s + bits > 32:  # spill the high bits into the next word
            words[:, w + 1] |= x[:, j] >> (32 - s)
    words = words.reshape(-1, *x.shape[2:])[: packed_len(n, bits)]
    # Reinterpret the unsigned 32-bit patterns as int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` codes along ``dim`` as uint8 (bits <= 8)."""
    w = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    total = -(-w.shape[0] // bits) * bits
    if total != w.shape[0]:
        w = torch.cat([w, w.new_zeros((total - w.shape[0], *w.shape[1:]))])
    w = w.reshape(-1, bits, *w.shape[1:])
    mask = (1 << bits) - 1
    out = torch.zeros((w.shape[0], 32, *w.shape[2:]), dtype=torch.int64)
    for j in range(32):
        off = j * bits
        i, s = divmod(off, 32)
        v = w[:, i] >> s
        if s + bits > 32:
            v = v | (w[:, i + 1] << (32 - s))
        out[:, j] = v & mask
    out = out.reshape(-1, *w.shape[2:])[:n]
    return out.to(torch.uint8).movedim(0, dim).contiguous()
