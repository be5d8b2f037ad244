"""Pack -> unpack is bit-exact, and the GPTQ layout matches an unpacker written from the published description."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.formats.gptq import GPTQFormat
from llmq.formats.packing import pack, unpack
from llmq.grid import IntGrid
from llmq.methods.rtn import rtn_quantize


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 100), cols=st.integers(1, 9), seed=st.integers(0, 2**16),
       dim=st.sampled_from([0, 1]))
def test_pack_unpack_roundtrip(bits, rows, cols, seed, dim):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int64).to(torch.uint8)
    words = pack(codes, bits, dim=dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == -(-codes.shape[dim] * bits // 32)
    assert torch.equal(unpack(words, bits, codes.shape[dim], dim=dim), codes)


def _reference_unpack_rows(qweight: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Straight from the GPTQ description: code i of a column sits at bit i*bits of the column's
    little-endian word stream (for 3 bits, 32 codes fill 3 words and may straddle two)."""
    words = [[int(v) & 0xFFFFFFFF for v in qweight[:, c].tolist()] for c in range(qweight.shape[1])]
    out = torch.zeros(n, qweight.shape[1], dtype=torch.int64)
    for c, col in enumerate(words):
        stream = sum(w << (32 * k) for k, w in enumerate(col))
        for i in range(n):
            out[i, c] = (stream >> (i * bits)) & ((1 << bits) - 1)
    return out


def _autogptq_pack_3bit(intweight: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's explicit 3-bit packing loop (rows = input dim), transcribed as a second reference."""
    iw = intweight.to(torch.int64).numpy()
    n, m = iw.shape
    import numpy as np

    q = np.zeros((n // 32 * 3, m), dtype=np.uint64)
    i = row = 0
    while row < q.shape[0]:
        for j in range(i, i + 10):
            q[row] |= (iw[j] << (3 * (j - i))).astype(np.uint64)
        i += 10
        q[row] |= (iw[i] << 30).astype(np.uint64)
        row += 1
        q[row] |= ((iw[i] >> 2) & 1).astype(np.uint64)
        i += 1
        for j in range(i, i + 10):
            q[row] |= (iw[j] << (3 * (j - i) + 1)).astype(np.uint64)
        i += 10
        q[row] |= (iw[i] << 31).astype(np.uint64)
        row += 1
        q[row] |= ((iw[i] >> 1) & 0x3).astype(np.uint64)
        i += 1
        for j in range(i, i + 10):
            q[row] |= (iw[j] << (3 * (j - i) + 2)).astype(np.uint64)
        i += 10
        row += 1
    q = q & 0xFFFFFFFF
    return torch.from_numpy((q.astype(np.int64) - ((q >= 2**31).astype(np.int64) << 32)).astype(np.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_reference_bitstream(bits):
    codes = torch.randint(0, 2**bits, (70, 5), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(_reference_unpack_rows(pack(codes, bits), bits, 70), codes)


def test_3bit_matches_autogptq_loop():
    codes = torch.randint(0, 8, (64, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(pack(codes, 3), _autogptq_pack_3bit(codes))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(96, 256), (172, 64), (64, 172)])
def test_gptq_format_roundtrip(bits, group_size, sym, shape):
    spec = IntGrid(bits=bits, group_size=group_size, sym=sym)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    qt = rtn_quantize(w, spec)
    fmt = GPTQFormat()
    t = fmt.pack(qt)
    out, inp = shape
    groups = spec.groups(inp)
    # exact names, dtypes and shapes of the GPTQ layout
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (-(-inp * bits // 32), out)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (groups, -(-out * bits // 32))
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (groups, out)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (inp,)
    back = fmt.unpack(t, spec, shape)
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(back.zeros, qt.zeros)
    assert torch.equal(back.g_idx, qt.g_idx)
    assert torch.equal(back.dequantize(), qt.dequantize())  # bitwise


def test_gptq_v1_zero_offset_independent():
    """v1 stores zero-1: an independent decode of qzeros+1 gives the symmetric midpoint."""
    spec = IntGrid(bits=4, group_size=32, sym=True)
    qt = rtn_quantize(torch.randn(16, 64), spec)
    t = GPTQFormat().pack(qt)
    z = _reference_unpack_rows(t["qzeros"].T.contiguous(), 4, 16).T + 1
    assert torch.all(z == 8)
