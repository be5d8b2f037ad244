"""safetensors files a tensor at a time: a writer whose memory use does not grow with the checkpoint, and
a reader that parses each file's header once.

Tensors are appended to a data file as they arrive; when a shard is full its header
is written and the data streamed behind it.  Files follow the safetensors format
(8-byte little-endian header length, JSON header padded to 8 bytes, raw data), so
any safetensors reader loads them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

# safetensors' dtype names and the torch dtypes they hold: what the writer names and the reader reads.
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
          "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64, "F16": torch.float16,
          "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Bytes per element of each safetensors dtype string, for sizing files without reading their data.
DTYPE_BYTES = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}


class Header:
    """A safetensors file's header, parsed once.  safetensors' safe_open parses the whole header at every
    opening: one opening per tensor costs the square of a file's tensor count (a mixture of experts' shard
    holds thousands).  Each tensor is read with plain file reads, never mapped: a streamed run's memory
    holds only the tensors it has taken.  The header is taken as it is: check it first (safe_open does)."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.entries: dict = json.loads(f.read(n))
        self.base = 8 + n

    def dtype_known(self, key: str) -> bool:
        return self.entries[key]["dtype"] in DTYPES

    def read(self, path: Path, key: str) -> torch.Tensor:
        """Tensor ``key`` of the file at ``path`` (this header's), in a buffer of its own."""
        entry = self.entries[key]
        dtype = DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        buf = bytearray(end - start)
        with open(path, "rb") as f:
            f.seek(self.base + start)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"the file ends inside tensor {key!r}")
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


class ShardedWriter:
    def __init__(self, directory: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.dir = Path(directory)
        self.max = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shards: list[tuple[Path, list[str]]] = []
        self._entries: dict[str, dict] = {}
        self._data: Path | None = None
        self._fh = None
        self._offset = 0
        self.total_size = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        t = tensor.detach().cpu().contiguous()
        # (the tensor's own bytes, written without a copy: a head or embedding is hundreds of MB)
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        if self._fh is not None and self._offset and self._offset + len(raw) > self.max:
            self._close_shard()
        if self._fh is None:
            self._data = self.dir / f".shard-{len(self._shards):05d}.data"
            self._fh = open(self._data, "wb")
            self._offset = 0
            self._entries = {}
        self._fh.write(raw)
        self._entries[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)
        self.total_size += len(raw)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()

    def state(self) -> dict:
        """Everything written so far, flushed to disk (for resuming an interrupted run)."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        return {"shards": [(str(p), names) for p, names in self._shards], "entries": dict(self._entries),
                "data": None if self._data is None else str(self._data), "offset": self._offset,
                "total_size": self.total_size, "names": sorted(self._names)}

    def restore(self, state: dict | None) -> None:
        """Continue from a ``state()`` (None: from nothing): what was written after it is cut off."""
        state = state or {"shards": [], "entries": {}, "data": None, "offset": 0, "total_size": 0, "names": []}
        self._shards = [(Path(p), list(names)) for p, names in state["shards"]]
        self._entries, self._offset, self.total_size = dict(state["entries"]), state["offset"], state["total_size"]
        self._names = set(state["names"])
        self._data = None if state["data"] is None else Path(state["data"])
        known = {p for p, _ in self._shards} | {self._data}
        for f in self.dir.glob(".shard-*"):  # shards begun after the state
            if f not in known:
                f.unlink()
        if self._data is not None:
            self._fh = open(self._data, "r+b")
            self._fh.truncate(self._offset)
            self._fh.seek(self._offset)

    def _close_shard(self) -> None:
        assert self._fh is not None and self._data is not None
        self._fh.close()
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * ((-len(header)) % 8)
        final = self.dir / f".shard-{len(self._shards):05d}.safetensors"
        with open(final, "wb") as out, open(self._data, "rb") as src:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(src, out, length=16 << 20)
        self._data.unlink()
        self._shards.append((final, list(self._entries)))
        self._fh, self._data = None, None

    def finish(self) -> list[Path]:
        """Close the last shard, give shards their HF names, write the index when sharded."""
        if self._fh is not None:
            self._close_shard()
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map: dict[str, str] = {}
        paths = []
        for (tmp, tensors), name in zip(self._shards, names):
            tmp.rename(self.dir / name)
            paths.append(self.dir / name)
            weight_map.update({t: name for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            paths.append(self.dir / "model.safetensors.index.json")
        return paths
