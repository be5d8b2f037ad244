"""Re-pack a quantized checkpoint into another format, one tensor at a time.

The codes, scales and zeros are read back into QuantizedTensors and handed to the
target format unchanged, so every export computes exactly the source's function; a
target that cannot represent them refuses (and nothing is written).  A GGUF file is
written from a float model by the quantize pipeline (RTN on each tensor's GGUF grid).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from llmq.checkpoint import iter_quantized, open_quantized
from llmq.config import QuantizeConfig, parse_size
from llmq.dtypes import SHORT_NAMES, dtype_name
from llmq.errors import LlmqError
from llmq.formats import FORMATS, format_for_config
from llmq.formats.base import Format
from llmq.pipeline import quantize_model
from llmq.provenance import PROVENANCE_FILE
from llmq.qtensor import QuantizedTensor
from llmq.sinks import CheckpointSink, emit_rest
from llmq.source import ModelSource

PLAIN = tuple(SHORT_NAMES)  # export targets that dequantize into an ordinary checkpoint: fp32, fp16, bf16


def export_checkpoint(src: str, target: str, out: str | Path, *, max_shard_size: str = "4GB", overwrite: bool = False,
                      trust_remote_code: bool = False) -> Path:
    if target not in FORMATS and target not in PLAIN:
        raise LlmqError(f"unknown export format {target!r}; choose from {', '.join([*FORMATS, *PLAIN])}")
    source, qcfg = open_quantized(src, trust_remote_code)
    if qcfg is None:
        raise LlmqError(f"{src!r} is not a quantized checkpoint; quantize it with `llmq quantize --format {target}`")
    reader = format_for_config(qcfg)
    fmt = None if target in PLAIN else FORMATS[target]
    recipe = {"export": {"from": src, "from_format": reader.name, "to": target}}
    return write_checkpoint(source, qcfg, fmt, out, iter_quantized(source.skeleton(torch.float32), source, qcfg), recipe,
                            dtype=SHORT_NAMES[target] if fmt is None else None, max_shard_size=max_shard_size,
                            overwrite=overwrite)


def write_checkpoint(source: ModelSource, qcfg: dict[str, Any], fmt: Format | None, out: str | Path,
                     quantized: Iterable[tuple[str, QuantizedTensor]], recipe: dict[str, Any], *,
                     floats: dict[str, torch.Tensor] | None = None, dtype: str | None = None, max_shard_size: str = "4GB",
                     overwrite: bool = False, inputs: list[Path] = ()) -> Path:
    """A checkpoint of ``source`` (a quantized one, config ``qcfg``) in ``fmt`` (None: plain, dequantized in
    ``dtype``): the ``quantized`` linears, the ``floats`` given, and every other tensor as the source has it.
    Its provenance names the model the source was made from and what made the source."""
    grid = format_for_config(qcfg).grid_from_config(qcfg)
    if fmt is not None:
        fmt.check(grid)
    model = source.skeleton(torch.float32)
    prev = previous_provenance(source.dir)
    out_dtype = dtype or dtype_name(getattr(source.config, "dtype", None))
    sink = CheckpointSink(source, model, fmt, grid, out, dtype=out_dtype, max_shard_bytes=parse_size(max_shard_size),
                          overwrite=overwrite, origin=prev["source"]["model"] if prev else source.name, inputs=inputs)
    with sink:
        done = set(floats or {})
        for name, t in (floats or {}).items():
            sink.add(name, t)
        for mod_name, qt in quantized:
            sink.add(f"{mod_name}.weight", qt if fmt is not None else qt.dequantize())
            done.add(f"{mod_name}.weight")
        emit_rest(sink, model, source, done=done.__contains__, rtn=_no_rounding)
        sink.finish({**recipe, "quantized_with": prev.get("recipe") if prev else None}, _facts_from(qcfg))
    return sink.path


def export_gguf(src: str, out: str | Path, gguf_type: str, *, overwrite: bool = False,
                token_embedding_type: str | None = None, output_type: str | None = None) -> list[str]:
    """A GGUF file from a float checkpoint: every tensor rounded to nearest on the type the plan gives it
    (what llama-quantize does without an importance matrix).  Returns notes for the user (tensors
    written as another type than planned)."""
    source = ModelSource(src)
    if getattr(source.config, "quantization_config", None) is not None:
        raise LlmqError(f"{src!r} is a quantized checkpoint; GGUF files are made from the float model: "
                        f"`llmq quantize --format gguf --gguf-type {gguf_type} --model <fp model>`")
    cfg = QuantizeConfig(method="rtn", format="gguf", gguf_type=gguf_type, gguf_token_embedding_type=token_embedding_type,
                         gguf_output_type=output_type)
    return quantize_model(source, cfg, out, overwrite=overwrite, progress=False).notes


def _no_rounding(t, grid):
    raise AssertionError("a checkpoint sink plans no grid for float tensors")


def _facts_from(qcfg: dict[str, Any]) -> dict[str, Any]:
    """The recipe facts a source checkpoint's config holds."""
    meta = qcfg.get("meta") or {}
    return {"act_order": bool(qcfg.get("desc_act", False) or meta.get("act_order", False)),
            "static_groups": qcfg.get("static_groups", False), "true_sequential": qcfg.get("true_sequential", True),
            "damp": qcfg.get("damp_percent", 0.01), "method": meta.get("method")}


def previous_provenance(d: Path) -> dict | None:
    p = d / PROVENANCE_FILE
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except json.JSONDecodeError:
        return None
