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
from torch import nn

import llmq
from llmq.arch import arch_for
from llmq.checkpoint import OutputDir, copy_sidecars, iter_quantized, quantization_config_of, write_config
from llmq.config import parse_size
from llmq.errors import LlmqError
from llmq.formats import FORMATS, PLAIN, format_for_config
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
        fmt.check(spec, bool(qcfg.get("desc_act", False)))
    model = source.skeleton(torch.float32)
    prev = _previous_provenance(source.dir)

    output = OutputDir(out, overwrite=overwrite)
    with output as tmp:
        writer = ShardedWriter(tmp, parse_size(max_shard_size))
        out_dtype = torch_dtype(PLAIN_DTYPES[target]) if plain else None
        done: set[str] = set()
        for mod_name, qt in iter_quantized(model, source, qcfg):
            key = source.checkpoint_key(f"{mod_name}.{reader.suffixes[0]}")
            base = key[: -len(reader.suffixes[0])]
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
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in done]
        new_qcfg = None if plain else fmt.quantization_config(spec, {**_extra_from(qcfg), "ignore": ignore, "version": llmq.__version__})
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


def _extra_from(qcfg: dict) -> dict:
    return {"act_order": qcfg.get("desc_act", False), "static_groups": qcfg.get("static_groups", False),
            "true_sequential": qcfg.get("true_sequential", True), "damp": qcfg.get("damp_percent", 0.01),
            "method": (qcfg.get("meta") or {}).get("method")}


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


def export_gguf(src: str, out: str | Path, gguf_type: str, *, overwrite: bool = False) -> list[str]:
    """A GGUF file from an fp checkpoint (RTN on the GGUF grid, or F16/F32) or a GGUF-grid llmq checkpoint.

    Returns notes for the user (tensors that fell back to a float type)."""
    from llmq.formats.gguf import GGUF_TYPES, check_arch, write_gguf
    from llmq.grid import GGUF_GRIDS, QuantSpec
    from llmq.methods.rtn import rtn_quantize

    gguf_type = gguf_type.upper()
    if gguf_type not in GGUF_TYPES:
        raise LlmqError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    _check_file_output(out, overwrite)
    source = ModelSource(src)
    check_arch(json.loads((source.dir / "config.json").read_text()))
    qcfg = quantization_config_of(source)
    grid = gguf_type.lower() if gguf_type.lower() in GGUF_GRIDS else None
    if qcfg is not None:
        spec = format_for_config(qcfg).spec_from_config(qcfg)
        if spec.grid != grid:
            raise LlmqError(f"{src!r} was quantized on the {spec.grid!r} grid, not {gguf_type}; "
                            f"quantize the fp model with --format gguf --gguf-type {gguf_type}")
        delattr(source.config, "quantization_config")
    model = source.skeleton(torch.float32)
    arch_layers = arch_for(model).layers + "."
    notes: list[str] = []

    def tensors():
        packed = set()
        if qcfg is not None:
            for mod_name, qt in iter_quantized(model, source, qcfg):
                packed.add(mod_name)
                yield source.checkpoint_key(f"{mod_name}.weight") or f"{mod_name}.weight", qt
        spec = QuantSpec(bits=GGUF_GRIDS[grid], group_size=32, grid=grid) if grid else None
        for name, p in model.named_parameters():
            owner = name.rpartition(".")[0]
            if owner in packed or name in source.tied:
                continue
            key = source.checkpoint_key(name) or name
            t = source.load_tensor(name)
            is_linear = isinstance(model.get_submodule(owner), nn.Linear) and name.startswith(arch_layers)
            if spec is not None and qcfg is None and is_linear and t.shape[1] % 32 == 0:
                yield key, rtn_quantize(t.float(), spec)
            else:
                if spec is not None and is_linear:
                    notes.append(f"{key}: {t.shape[1]} columns are not a multiple of 32; written as "
                                 f"{'F32' if gguf_type == 'F32' else 'F16'}")
                yield key, t

    write_gguf(source.dir, out, gguf_type, tensors(), name=Path(src).name)
    return notes


def quantize_to_gguf(source: ModelSource, cfg, out: str | Path, *, overwrite: bool = False, device: str = "cpu",
                     progress: bool = True) -> list[str]:
    """`quantize --format gguf`: the method quantizes on the GGUF block grid, then the file is written."""
    import dataclasses
    import shutil
    import tempfile

    from llmq.formats.gguf import check_arch
    from llmq.pipeline import quantize_model

    out = Path(out)
    _check_file_output(out, overwrite)
    check_arch(json.loads((source.dir / "config.json").read_text()))
    if cfg.gguf_type.upper() in ("F16", "F32"):
        return export_gguf(str(source.dir), out, cfg.gguf_type, overwrite=overwrite)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".llmq-stage", dir=out.parent))
    try:
        staged = dataclasses.replace(cfg, format="gptq_v2", dtype="float32")
        quantize_model(source, staged, stage / "q", device=device, progress=progress)
        return export_gguf(str(stage / "q"), out, cfg.gguf_type, overwrite=overwrite)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
