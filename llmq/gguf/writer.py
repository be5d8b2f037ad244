"""A GGUF file as the output sink of a quantization run.

Tensors arrive one at a time, as the pipeline produces them; their bytes go straight to a data file
beside the output (an expert's projection waits only until its layer's other experts arrive: llama.cpp
holds them stacked), so memory never holds more than the tensor at hand.  At the end the header,
metadata and tokenizer are written and the data appended behind them, and the file is renamed into
place.  The decoder layers' quantized tensors are listed first, in the order they arrived, then every
other tensor in the model's parameter order (the order earlier llmq versions wrote, kept so that files
stay byte-identical).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from llmq.errors import LlmqError
from llmq.gguf.model import (GGUF_ARCHS, PROVENANCE_KEY, add_metadata, check_arch, expert_counts, gguf_config, head_dim,
                             llama3_rope_factors, rope_of, row_order, stored_float)
from llmq.gguf.plan import GGUFPlan, expert_index, tensor_namer
from llmq.gguf.types import BLOCK_TYPES, FLOAT_TYPES, BlockType, check_type
from llmq.gguf.vocab import add_tokenizer, load_vocab
from llmq.grid import Grid
from llmq.output import Output
from llmq.provenance import embedded
from llmq.qtensor import QuantizedTensor
from llmq.rules import Rule, first_match
from llmq.sinks import Sink, require_finite
from llmq.source import ModelSource


@dataclass
class _Entry:
    gname: str
    shape: tuple[int, ...]  # of the stored array (bytes per row for block types)
    dtype: np.dtype
    raw: Any  # GGMLQuantizationType, or None for plain F32/F16 arrays
    offset: int  # in the data file
    nbytes: int
    rank: tuple[int, int]  # sort key: (0, arrival) quantized decoder tensors, (1, parameter index) the rest


ROWS_AT_ONCE = 1 << 22  # values encoded per step


class GGUFSink(Sink):
    def __init__(self, source: ModelSource, model: nn.Module, out: str | Path, gguf_type: str, *,
                 token_embedding_type: str | None = None, output_type: str | None = None, overwrite: bool = False,
                 inputs: list[Path] = (), resume: bool = False, rules: tuple[Rule, ...] = (),
                 recipe: dict[str, Any]):
        """``recipe``: what the file's provenance records (PROVENANCE_KEY), known before the run: a size
        budget's sizing (file_bytes) must find the header the file will have."""
        self.source = source
        self.rules = rules
        self.recipe = recipe
        self.cfg = gguf_config(source.config)
        check_arch(self.cfg)
        load_vocab(source.dir, self.cfg["vocab_size"])  # a tokenizer GGUF cannot hold fails now, not after the calibration
        self.gguf_type = check_type(gguf_type)
        self.namer = tensor_namer(self.cfg)
        self.keys = {n: source.checkpoint_key(n) or n for n, _ in model.named_parameters()}
        # tied embeddings: token_embd is the head too
        has_output = any(self.namer(k) == "output.weight" for n, k in self.keys.items() if n not in source.tied)
        self.plan = GGUFPlan(self.gguf_type, self.cfg["num_hidden_layers"], has_output=has_output,
                             token_embd_type=check_type(token_embedding_type, "--gguf-token-embedding-type", mixes=False)
                             if token_embedding_type else None,
                             output_type=check_type(output_type, "--gguf-output-type", mixes=False) if output_type else None)
        self.param_index = {n: i for i, n in enumerate(self.keys)}
        self.output = Output(out, kind="file", overwrite=overwrite, inputs=[source.dir, *inputs], resume=resume)
        self.n_expert, _ = expert_counts(self.cfg)
        self.notes: list[str] = []  # tensors written as another type than planned (once per stacked tensor)
        self._entries: list[_Entry] = []
        self._experts: dict[str, dict[int, tuple[np.ndarray, Any, tuple[int, int]]]] = {}
        self._arrived = 0

    # ---- the sink ----------------------------------------------------------------------
    def open(self) -> None:
        self.tmp = self.work / Output.FILE
        self.data_path = self.work / "data"
        self.data = open(self.data_path, "r+b" if self.data_path.exists() else "w+b")  # (kept for a resume)

    def close(self) -> None:
        self.data.close()

    def state(self) -> dict:
        self.data.flush()
        os.fsync(self.data.fileno())
        return {"offset": self.data.tell(), "entries": list(self._entries), "experts": dict(self._experts),
                "arrived": self._arrived, "notes": list(self.notes)}

    def restore(self, state: dict | None) -> None:
        state = state or {"offset": 0, "entries": [], "experts": {}, "arrived": 0, "notes": []}
        self.data.truncate(state["offset"])
        self.data.seek(state["offset"])
        self._entries, self._experts = list(state["entries"]), dict(state["experts"])
        self._arrived, self.notes = state["arrived"], list(state["notes"])

    def _gguf_name(self, name: str) -> str:
        gname = self.namer(self.keys.get(name, name))
        if gname is None:
            raise LlmqError(f"no GGUF name for tensor {self.keys.get(name, name)!r}")
        return gname

    def _type(self, name: str, shape: tuple[int, ...]) -> str:
        t, note = self.plan.tensor_type(self._gguf_name(name), shape, self.rule_type(name))
        if note and note not in self.notes:
            self.notes.append(note)
        return t

    def rule_type(self, name: str) -> str | None:
        """The type the first rule matching this tensor's module sets (keep: F16, or the file's float type)."""
        rule = first_match(self.rules, name.removesuffix(".weight"))
        if rule is None or not name.endswith(".weight"):
            return None
        return ("F16" if self.plan.quantized else self.plan.file_type) if rule.keep else rule.type

    def grid_for(self, name: str, shape: tuple[int, ...], proposed: Grid | None) -> BlockType | None:
        return BLOCK_TYPES.get(self._type(name, shape))

    def add(self, name: str, value: torch.Tensor | QuantizedTensor) -> None:
        require_finite(name, value)
        key, gname = self.keys.get(name, name), self._gguf_name(name)
        order = row_order(self.cfg, key, value.shape[0])
        if order is not None:
            value = value.rows(order) if isinstance(value, QuantizedTensor) else value[order]
        encode, raw, rank = self._encoder(name, key, gname, value)
        self._arrived += 1
        stacked = expert_index(key)
        if stacked is None:
            # rows are encoded a slice at a time: a 262k-token embedding never exists twice in memory
            step = max(1, ROWS_AT_ONCE // value.shape[-1]) if len(value.shape) == 2 else value.shape[0]
            self._write(gname, (encode(slice(i, i + step)) for i in range(0, value.shape[0], step)), raw, rank)
            return
        # an expert's projection waits until its layer's others arrive: llama.cpp holds them stacked
        have = self._experts.setdefault(gname, {})
        have[stacked[1]] = (encode(slice(None)), raw, rank)
        if len(have) == self.n_expert:
            if sorted(have) != list(range(self.n_expert)) or len({(d.shape, r) for d, r, _ in have.values()}) != 1:
                raise LlmqError(f"{gname}: the experts' tensors differ in index, shape or type")
            del self._experts[gname]
            stacked_data = np.stack([have[e][0] for e in range(self.n_expert)])
            self._write(gname, iter([stacked_data]), have[0][1], max(r for _, _, r in have.values()))

    def _encoder(self, name: str, key: str, gname: str, value: torch.Tensor | QuantizedTensor):
        """(rows -> stored bytes, raw GGUF type or None, sort rank) of one tensor."""
        if isinstance(value, QuantizedTensor):
            grid = value.grid
            if not isinstance(grid, BlockType):
                raise LlmqError(f"{key} is quantized on the {grid.name} grid, which GGUF cannot store")
            rank = (0, self._arrived) if gname.startswith("blk.") else (1, self.param_index.get(name, len(self.param_index)))
            return (lambda rows: grid.pack(value.rows(torch.arange(value.shape[0])[rows]))), grid.ggml_type, rank
        planned = self._type(name, tuple(value.shape))
        if planned not in FLOAT_TYPES:
            raise LlmqError(f"{key} is planned as {planned} but arrived unquantized")
        ftype = FLOAT_TYPES[planned]
        raw = ftype.ggml_type if ftype.type_name == "BF16" else None
        return (lambda rows: ftype.encode(stored_float(self.cfg, gname, value[rows]))), raw, (1, self.param_index.get(name, len(self.param_index)))

    def _write(self, gname: str, parts, raw: Any, rank: tuple[int, int]) -> None:
        offset, rows, nbytes, shape, dtype = self.data.tell(), 0, 0, (), None
        for data in parts:
            data = np.ascontiguousarray(data)
            data.tofile(self.data)
            rows, nbytes, shape, dtype = rows + data.shape[0], nbytes + data.nbytes, data.shape[1:], data.dtype
        self._entries.append(_Entry(gname, (rows, *shape), dtype, raw, offset, nbytes, rank))

    def finish(self, recipe: dict[str, Any], facts: dict[str, Any], records: list[dict] | None = None) -> None:
        if self._experts:
            gname, have = next(iter(self._experts.items()))
            raise LlmqError(f"{gname}: {len(have)} of the model's {self.n_expert} experts found")
        self.data.close()
        entries = sorted(self._entries, key=lambda e: e.rank)
        extra = rope_tensors(self.cfg)
        w = _header(self.tmp, self.source, self.cfg, self.gguf_type,
                    [(gname, arr.shape, arr.dtype, arr.nbytes, None) for gname, arr in extra]
                    + [(e.gname, e.shape, e.dtype, e.nbytes, e.raw) for e in entries], self.recipe)
        out = w.fout[0]
        w.write_padding(out, out.tell())
        for _, arr in extra:
            arr.tofile(out)
            w.write_padding(out, arr.nbytes)
        with open(self.data_path, "rb") as src:
            for e in entries:
                src.seek(e.offset)
                _copy(src, out, e.nbytes)
                w.write_padding(out, e.nbytes)
        w.close()


def _header(path: Path, source: ModelSource, cfg: dict[str, Any], gguf_type: str, infos: list[tuple],
            recipe: dict[str, Any]):
    """A GGUFWriter at ``path`` that has written the header, metadata (with the provenance of ``recipe``) and
    tensor infos ((name, shape, dtype, nbytes, raw type) each); the tensor data follow, each aligned."""
    import gguf

    w = gguf.GGUFWriter(str(path), GGUF_ARCHS[cfg["model_type"]])
    add_metadata(w, cfg, source.display_name, gguf_type)
    prov = embedded(source.name, source.revision, source.file_hashes(), recipe)
    w.add_string(PROVENANCE_KEY, json.dumps(prov, sort_keys=True))
    add_tokenizer(w, source.dir, cfg["vocab_size"])
    for gname, shape, dtype, nbytes, raw in infos:
        w.add_tensor_info(gname, shape, dtype, nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def rope_tensors(cfg: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Llama 3.1-style rotary scaling, which llama.cpp takes as a tensor of frequency divisors."""
    rope = rope_of(cfg)
    if rope.get("rope_type") != "llama3":
        return []
    return [("rope_freqs.weight", llama3_rope_factors(rope, head_dim(cfg), float(rope["rope_theta"])).numpy())]


def file_bytes(source: ModelSource, model: nn.Module, gguf_type: str, type_of: Callable[[str, tuple[int, ...]], str],
               recipe: dict[str, Any]) -> int:
    """The exact size of the GGUF file of ``model`` whose tensors get the types ``type_of(gguf name, shape)``
    gives (experts stacked, as the sink writes them) and whose provenance records ``recipe``: the header
    is built as the sink builds it, and only the tensor bytes depend on the types."""
    cfg = gguf_config(source.config)
    namer, (n_expert, _) = tensor_namer(cfg), expert_counts(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, p in model.named_parameters():
        if name in source.tied:
            continue
        key = source.checkpoint_key(name) or name
        shapes[namer(key) or key] = (n_expert, *p.shape) if expert_index(key) else tuple(p.shape)
    extra = rope_tensors(cfg)
    with tempfile.TemporaryDirectory() as d:
        w = _header(Path(d) / "h.gguf", source, cfg, gguf_type,
                    [(g, a.shape, a.dtype, a.nbytes, None) for g, a in extra]
                    + [(g, s, np.float32, 4 * math.prod(s), None) for g, s in shapes.items()], recipe)
        w.fout[0].flush()
        header = w.fout[0].tell()
        w.close()
    total = _aligned(header) + sum(_aligned(a.nbytes) for _, a in extra)
    for g, s in shapes.items():
        t = "F32" if len(s) == 1 else type_of(g, s)
        total += _aligned(BLOCK_TYPES[t].nbytes(s) if t in BLOCK_TYPES else math.prod(s) * FLOAT_TYPES[t].itemsize)
    return total


def _aligned(n: int, alignment: int = 32) -> int:  # (GGUF's default alignment, which llmq's files keep)
    return n + (-n) % alignment


def _copy(src, dst, n: int, chunk: int = 16 << 20) -> None:
    while n > 0:
        block = src.read(min(chunk, n))
        if not block:
            raise LlmqError("the GGUF data file ended early")
        dst.write(block)
        n -= len(block)
