"""Re-pack a quantized checkpoint into another format, one tensor at a time.

The codes, scales and zeros are read back into QuantizedTensors and handed to the
target format unchanged, so every export computes exactly the source's function; a
target that cannot represent them refuses (and nothing is written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import llmq
from llmq.checkpoint import (OutputDir, copy_sidecars, iter_quantized, quantization_config_of, stored_prefix,
                             unquantized_linears, write_config)
from llmq.config import parse_size
from llmq.errors import LlmqError
from llmq.formats import FORMATS, PLAIN, format_for_config
from llmq.formats.base import natural_g_idx
from llmq.grid import QuantSpec
from llmq.provenance import PROVENANCE_FILE, hash_tree, record, sha256_file
from llmq.safetensors_stream import ShardedWriter
from llmq.source import ModelSource, torch_dtype

PLAIN_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def export_checkpoint(src: str, target: str, out: str | Path, *, max_shard_size: str = "4GB", overwrite: bool = False,
                      trust_remote_code: bool = False) -> Path:
    if target not in FORMATS and target not in PLAIN:
        raise LlmqError(f"unknown export format {target!r}; choose from {', '.join([*FORMATS, *PLAIN])}")
    source = ModelSource(src, trust_remote_code=trust_remote_code)
    qcfg = quantization_config_of(source)
    if qcfg is None:
        raise LlmqError(f"{src!r} is not a quantized checkpoint; quantize it with `llmq quantize --format {target}`")
    reader = format_for_config(qcfg)
    spec = reader.spec_from_config(qcfg)
    delattr(source.config, "quantization_config")
    plain = target in PLAIN
    fmt = None if plain else FORMATS[target]
    if fmt is not None:
        fmt.check(spec)
    model = source.skeleton(torch.float32)
    prev = _previous_provenance(source.dir)

    output = OutputDir(out, overwrite=overwrite)
    with output as tmp:
        writer = ShardedWriter(tmp, parse_size(max_shard_size))
        out_dtype = torch_dtype(PLAIN_DTYPES[target]) if plain else None
        done: set[str] = set()
        natural = True
        for mod_name, qt in iter_quantized(model, source, qcfg):
            natural = natural and natural_g_idx(qt)
            base = stored_prefix(source, mod_name, reader.suffixes[0])
            if plain:
                writer.add(base + "weight", qt.dequantize(out_dtype))
            else:
                for suffix, t in fmt.pack(qt).items():
                    writer.add(base + suffix, t)
            done.add(mod_name)
        for name, _ in model.named_parameters():
            owner = name.rpartition(".")[0]
            if (owner in done and name.endswith(".weight")) or name in source.tied:
                continue
            t = source.load_tensor(name)
            writer.add(source.checkpoint_key(name) or name, t.to(out_dtype) if plain and t.is_floating_point() else t)
        writer.finish()
        dtype = PLAIN_DTYPES[target] if plain else _dtype_name(getattr(source.config, "dtype", None))
        ignore = unquantized_linears(model, source, done)  # (checkpoint names, MoE routers included)
        new_qcfg = None if plain else fmt.quantization_config(spec, {**_extra_from(qcfg, natural), "ignore": ignore, "version": llmq.__version__})
        write_config(source.dir, tmp, dtype, new_qcfg)
        copy_sidecars(source.dir, tmp)
        recipe = {"export": {"from": src, "from_format": reader.name, "to": target},
                  "quantized_with": prev.get("recipe") if prev else None}
        prov = record(prev["source"]["model"] if prev else src, None,
                      {str(p.relative_to(source.dir)): sha256_file(p) for p in source.files()}, recipe, hash_tree(tmp))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n")
    return output.path


def _dtype_name(d) -> str:
    """A config's dtype (torch.dtype, string or unset) as the string config.json holds."""
    if isinstance(d, torch.dtype):
        return str(d).removeprefix("torch.")
    return d or "float16"


def _extra_from(qcfg: dict, natural: bool) -> dict:
    """The recipe facts a source checkpoint's config holds; ``natural``: every g_idx read was i // group_size."""
    meta = qcfg.get("meta") or {}
    return {"act_order": bool(qcfg.get("desc_act", False) or meta.get("act_order", False)), "natural_g_idx": natural,
            "static_groups": qcfg.get("static_groups", False),
            "true_sequential": qcfg.get("true_sequential", True), "damp": qcfg.get("damp_percent", 0.01),
            "method": meta.get("method")}


def _previous_provenance(d: Path) -> dict | None:
    p = d / PROVENANCE_FILE
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except json.JSONDecodeError:
        return None


# ---- GGUF ------------------------------------------------------------------------------

def _check_file_output(out: Path, overwrite: bool) -> None:
    if out.exists() and (out.is_dir() or not overwrite):
        raise LlmqError(f"output {str(out)!r} exists" + ("" if out.is_dir() else " (pass --overwrite to replace it)"))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlmqError(f"cannot create output directory {str(out.parent)!r}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise LlmqError(f"output directory {str(out.parent)!r} is not writable")


def export_gguf(src: str, out: str | Path, gguf_type: str, *, overwrite: bool = False,
                token_embedding_type: str | None = None, output_type: str | None = None) -> list[str]:
    """A GGUF file from an fp checkpoint (RTN on the GGUF grids, or a float type) or from the staged
    checkpoint of `quantize --format gguf` (the method's codes for the decoder linears).

    Each tensor gets the type the plan gives it (gguf_plan); quantized tensors the staged
    checkpoint lacks (token embedding, output head) are rounded to nearest, as llama-quantize
    does.  Returns notes for the user (tensors written as another type than planned)."""
    from llmq.formats.gguf import check_arch, write_gguf
    from llmq.gguf_plan import GGUFPlan, check_gguf_type, gguf_config, tensor_namer
    from llmq.methods.rtn import rtn_quantize

    gguf_type = check_gguf_type(gguf_type)
    if token_embedding_type:
        token_embedding_type = check_gguf_type(token_embedding_type, "--gguf-token-embedding-type", mixes=False)
    if output_type:
        output_type = check_gguf_type(output_type, "--gguf-output-type", mixes=False)
    out = Path(out)
    _check_file_output(out, overwrite)
    source = ModelSource(src)
    config = gguf_config(source)
    check_arch(config)
    qcfg = quantization_config_of(source)
    if qcfg is not None:
        delattr(source.config, "quantization_config")
        suffix = format_for_config(qcfg).suffixes[0]
    model = source.skeleton(torch.float32)
    namer = tensor_namer(config)
    has_output = any(namer(source.checkpoint_key(n) or n) == "output.weight" for n, _ in model.named_parameters()
                     if n not in source.tied)  # tied embeddings: token_embd is the head too
    plan = GGUFPlan(gguf_type, config["num_hidden_layers"], has_output=has_output,
                    token_embd_type=token_embedding_type, output_type=output_type)
    notes: list[str] = []

    def planned(key: str, shape: tuple[int, ...]) -> str:
        t, note = plan.tensor_type(namer(key) or key, shape)
        if note:
            notes.append(note)
        return t

    def tensors():
        packed = set()
        if qcfg is not None:
            for mod_name, qt in iter_quantized(model, source, qcfg):
                key = f"{stored_prefix(source, mod_name, suffix)}weight"
                want = planned(key, qt.shape)
                if qt.spec.grid != want.lower():
                    raise LlmqError(f"{src!r}: {key} was quantized on the {qt.spec.grid!r} grid, but {gguf_type} stores "
                                    f"it as {want}; quantize the fp model with --format gguf --gguf-type {gguf_type}")
                packed.add(mod_name)
                yield key, qt, want
        for name, _ in model.named_parameters():
            owner = name.rpartition(".")[0]
            if (owner in packed and name.endswith(".weight")) or name in source.tied:  # biases stay float
                continue
            key = source.checkpoint_key(name) or name
            t = source.load_tensor(name)
            want = planned(key, tuple(t.shape))
            if want in ("F32", "F16", "BF16"):
                yield key, t, want
            else:
                yield key, rtn_quantize(t.float(), QuantSpec.for_gguf(want.lower())), want

    write_gguf(source.dir, config, out, gguf_type, tensors(), name=Path(src).name)
    return list(dict.fromkeys(notes))  # (once per stacked tensor, not once per expert)


def quantize_to_gguf(source: ModelSource, cfg, out: str | Path, *, overwrite: bool = False, device: str = "cpu",
                     progress: bool = True) -> list[str]:
    """`quantize --format gguf`: the method quantizes on the GGUF block grid, then the file is written."""
    import dataclasses
    import shutil
    import tempfile

    from llmq.formats.gguf import check_arch, load_vocab
    from llmq.gguf_plan import FLOAT_TYPES, gguf_config
    from llmq.pipeline import quantize_model

    out = Path(out)
    _check_file_output(out, overwrite)
    check_arch(gguf_config(source))
    load_vocab(source.dir)  # a tokenizer GGUF cannot hold fails now, not after the calibration
    types = {"token_embedding_type": cfg.gguf_token_embedding_type, "output_type": cfg.gguf_output_type}
    if cfg.gguf_type.upper() in FLOAT_TYPES:
        return export_gguf(str(source.dir), out, cfg.gguf_type, overwrite=overwrite, **types)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".llmq-stage", dir=out.parent))
    try:
        # the staged checkpoint keeps every code, scale and minimum exactly (the raw layout)
        staged = dataclasses.replace(cfg, format="raw", dtype="float32")
        quantize_model(source, staged, stage / "q", device=device, progress=progress)
        return export_gguf(str(stage / "q"), out, cfg.gguf_type, overwrite=overwrite, **types)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
