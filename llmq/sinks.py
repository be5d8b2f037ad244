"""Where a run's tensors go: one interface for every output, fed tensor by tensor.

The pipeline (and export) hand a sink each tensor of the model under its parameter name, as a
QuantizedTensor or a float tensor, in the order they are produced; the sink says which grid a
tensor goes on (the recipe's, or what its file format plans for it) and lays the bytes out.
``emit_rest`` is the one loop that copies what no layer produced.  The GGUF sink lives in
llmq.gguf.writer; this module has the safetensors checkpoint directory.
"""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import llmq
from llmq.dtypes import dtype_name, torch_dtype
from llmq.errors import LlmqError
from llmq.experts import ExpertLinears
from llmq.formats.base import Format, natural_g_idx, refuse
from llmq.grid import Grid, IntGrid
from llmq.output import Output
from llmq.provenance import PROVENANCE_FILE, hash_tree, record
from llmq.qtensor import QuantizedTensor
from llmq.safetensors_stream import ShardedWriter
from llmq.source import ModelSource

LOG_FILE = "llmq_quantize_log.jsonl"
# Everything a runtime needs besides the weights; copied verbatim from the source.
SIDECAR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
)


class Sink(ABC):
    """An output being written.  Use as a context manager: the output appears only if the block completes."""

    notes: list[str]  # tensors stored otherwise than planned (a width a type or block cannot hold), for the user

    def grid_for(self, name: str, shape: tuple[int, ...], proposed: Grid | None) -> Grid | None:
        """The grid the parameter ``name`` is stored on; ``proposed`` is the recipe's (None: it stays
        float).  A format with a per-tensor plan (GGUF) answers for every tensor."""
        return proposed

    @abstractmethod
    def add(self, name: str, value: torch.Tensor | QuantizedTensor) -> None:
        """One parameter of the model, under its name in the model."""

    @abstractmethod
    def finish(self, recipe: dict[str, Any], facts: dict[str, Any], records: list[dict] | None = None) -> None:
        """Write what follows the tensors.  ``recipe``: for the provenance record; ``facts``: how the codes
        were made (method, act_order, damp, ...) for the format's config; ``records``: the per-module log."""

    @abstractmethod
    def state(self) -> Any:
        """What has been written so far, flushed to disk: enough to continue from here (llmq.journal)."""

    @abstractmethod
    def restore(self, state: Any) -> None:
        """Continue from a ``state()`` of an interrupted run (None: from the start): anything written after it is cut off."""

    output: Output

    def __enter__(self) -> "Sink":
        self.work = self.output.__enter__()
        try:
            self.open()
        except BaseException as e:
            self.output.__exit__(type(e), e, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        self.output.__exit__(exc_type, exc, tb)

    @abstractmethod
    def open(self) -> None:
        """Start writing into ``self.work``."""

    def close(self) -> None:
        """Release open files (before the output is committed or discarded)."""

    @property
    def path(self) -> Path:
        return self.output.path


class Follower(Sink):
    """What the other ranks of a distributed run (llmq.distributed) hold instead of the output: the
    leader's sink answers which grid each tensor goes on; nothing is written."""

    def __init__(self, planned: Sink):
        self.planned = planned
        self.notes: list[str] = []

    def grid_for(self, name: str, shape: tuple[int, ...], proposed: Grid | None) -> Grid | None:
        return self.planned.grid_for(name, shape, proposed)

    def add(self, name: str, value: torch.Tensor | QuantizedTensor) -> None:
        pass

    def finish(self, recipe: dict[str, Any], facts: dict[str, Any], records: list[dict] | None = None) -> None:
        pass

    def state(self) -> Any:
        return None

    def restore(self, state: Any) -> None:
        pass

    def open(self) -> None:
        pass

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass

    @property
    def path(self) -> Path:
        return self.planned.path


def require_finite(name: str, value: torch.Tensor | QuantizedTensor) -> None:
    """Nothing non-finite is written (a NaN scale would poison its whole group in every runtime)."""
    parts = [value.scales, *([] if value.offsets is None else [value.offsets])] if isinstance(value, QuantizedTensor) \
        else [value] if value.is_floating_point() else []
    if any(not bool(torch.isfinite(t).all()) for t in parts):
        raise LlmqError(f"{name}: the output would hold non-finite values (NaN/Inf); nothing was written")


def emit_rest(sink: Sink, model: nn.Module, source: ModelSource, done: Callable[[str], bool],
              rtn: Callable[[torch.Tensor, Grid], QuantizedTensor],
              proposed: Callable[[str], Grid | None] = lambda name: None) -> None:
    """Every parameter no earlier step emitted (``done``), read from the source one at a time; one the
    sink plans a grid for (``proposed``: the recipe's, e.g. for a head a rule quantizes) is rounded to
    nearest with ``rtn`` (no calibration reaches it)."""
    for name, param in model.named_parameters():
        if done(name) or name in source.tied:
            continue
        t = source.load_like(name, param)
        grid = sink.grid_for(name, tuple(t.shape), proposed(name))
        sink.add(name, t if grid is None else rtn(t, grid))


class CheckpointSink(Sink):
    """A safetensors checkpoint directory in one of the packed formats (or plain, ``fmt`` None)."""

    def __init__(self, source: ModelSource, model: nn.Module, fmt: Format | None, grid: Grid | None, out: str | Path, *,
                 dtype: str, max_shard_bytes: int, overwrite: bool = False, origin: str | None = None,
                 inputs: list[Path] = (), resume: bool = False):
        self.source, self.model, self.fmt, self.grid = source, model, fmt, grid
        self.dtype = torch_dtype(dtype)
        self.max_shard_bytes = max_shard_bytes
        self.origin = origin or source.name  # the model the provenance names as the source
        self.output = Output(out, kind="dir", overwrite=overwrite, inputs=[source.dir, *inputs], resume=resume)
        self.quantized: dict[str, Grid] = {}  # module -> its grid, in arrival order
        self.natural = True  # every packed g_idx is i // group_size (no reordering for runtimes to do)
        self.notes: list[str] = []

    def grid_for(self, name: str, shape: tuple[int, ...], proposed: Grid | None) -> Grid | None:
        grid = None if proposed is None else proposed.for_width(shape[-1])
        if proposed is not None and grid is None:
            self.notes.append(f"{self.source.checkpoint_key(name) or name}: {shape[-1]} columns do not fit {proposed.name} "
                              "blocks; left unquantized")
        return grid

    def open(self) -> None:
        self.dir = self.work
        self.writer = ShardedWriter(self.dir, self.max_shard_bytes)

    def close(self) -> None:
        self.writer.close()

    def state(self) -> dict:
        return {"writer": self.writer.state(), "quantized": dict(self.quantized), "natural": self.natural}

    def restore(self, state: dict | None) -> None:
        self.writer.restore(state and state["writer"])
        self.quantized, self.natural = (dict(state["quantized"]), state["natural"]) if state else ({}, True)

    def add(self, name: str, value: torch.Tensor | QuantizedTensor) -> None:
        require_finite(name, value)
        if isinstance(value, QuantizedTensor):
            module = name.removesuffix(".weight")
            if not self.fmt.mixes_grids and isinstance(self.grid, IntGrid) and value.grid != self.grid:
                raise refuse(self.fmt.name, f"{module} is on the {value.grid.name} grid and the rest on {self.grid.name}; "
                                            "this format stores one grid for all its linears")
            prefix = self.source.module_key(module) + "."
            for suffix, t in self.fmt.pack(value).items():
                self.writer.add(prefix + suffix, t)
            self.quantized[module] = value.grid
            self.natural = self.natural and natural_g_idx(value)
            return
        key = self.source.checkpoint_key(name)
        t = value.to(self.dtype) if value.is_floating_point() else value
        self.writer.add(key or name, self.source.stored(name, t))

    def finish(self, recipe: dict[str, Any], facts: dict[str, Any], records: list[dict] | None = None) -> None:
        self.writer.finish()
        qcfg = None
        if self.fmt is not None:
            ignore = unquantized_linears(self.model, self.source, set(self.quantized))
            head = self.model.get_output_embeddings()
            skipped = [k for k in ignore if head is None or k != self.source.module_key(_name_of(self.model, head))]  # (decoder's)
            grids = {self.source.module_key(m): g for m, g in self.quantized.items()}
            head_key = None if head is None else self.source.module_key(_name_of(self.model, head))
            qcfg = self.fmt.quantization_config(_most_common(list(grids.values())) or self.grid,
                                                {**facts, "natural_g_idx": self.natural, "ignore": ignore, "grids": grids,
                                                 "skipped": skipped, "head_quantized": head_key in grids,
                                                 "version": llmq.__version__})
        write_config(self.source.dir, self.dir, dtype_name(self.dtype), qcfg)
        copy_sidecars(self.source.dir, self.dir)
        if records is not None:
            with open(self.dir / LOG_FILE, "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        prov = record(self.origin, self.source.revision if self.origin == self.source.name else None,
                      self.source.file_hashes(),
                      recipe, hash_tree(self.dir))
        (self.dir / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n")


def _most_common(grids: list[Grid]) -> Grid | None:
    """The grid most linears use (the first of those tied): the base a format's per-module overrides refer to."""
    return Counter(grids).most_common(1)[0][0] if grids else None


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def copy_sidecars(src_dir: Path, dst_dir: Path) -> None:
    """Tokenizer and generation files; and a remote-code model's Python modules, which its config's auto_map
    names: without them the output's config points at code that is not there."""
    names = [n for n in SIDECAR_FILES if (src_dir / n).is_file()]
    if "auto_map" in json.loads((src_dir / "config.json").read_text()):
        names += [p.name for p in sorted(src_dir.glob("*.py"))]
    for name in names:
        shutil.copyfile(src_dir / name, dst_dir / name)  # not copy2: keep our umask, not read-only modes


def write_config(src_dir: Path, dst_dir: Path, dtype: str, quantization_config: dict[str, Any] | None) -> None:
    """The source config.json, with the output dtype and (if quantized) quantization_config."""
    cfg = json.loads((src_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = dtype
    cfg["torch_dtype"] = dtype  # transformers < 5 and runtimes built on them read this key
    cfg["use_cache"] = True
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (dst_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def unquantized_linears(model: nn.Module, source: ModelSource, quantized: set[str]) -> list[str]:
    """Checkpoint names of the linears left in floating point (for loaders' ignore lists).

    MoE routers count: transformers holds them as bare weights, runtimes build them as linears."""
    routers = {f"{owner}.{n}" if owner else n for owner, block in model.named_modules()
               if any(isinstance(c, ExpertLinears) for c in block.children())
               for n, c in block.named_children() if not isinstance(c, (nn.Linear, ExpertLinears))
               and isinstance(getattr(c, "weight", None), torch.Tensor) and c.weight.dim() == 2}
    return [source.module_key(name) for name, mod in model.named_modules()
            if (isinstance(mod, nn.Linear) or name in routers) and name not in quantized]
