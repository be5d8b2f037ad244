"""Layer-streaming quantization.

    capture inputs of layer 0  ->  for each decoder layer:
        read its weights from disk -> let the method observe/quantize its linears
        -> run the quantized layer to get the next layer's inputs
        -> write its packed tensors -> drop its weights

Only one decoder layer's weights are ever resident; embeddings are read for the
capture and dropped, the rest of the checkpoint is copied tensor by tensor.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

import llmq
from llmq.activations import LayerInputs
from llmq.arch import Arch, arch_for, get_module, layer_linears, trace_arch
from llmq.checkpoint import OutputDir, copy_sidecars, unquantized_linears, write_config
from llmq.config import QuantizeConfig, parse_size
from llmq.errors import LlmqError
from llmq.formats import FORMATS
from llmq.formats.base import natural_g_idx
from llmq.grid import QuantSpec
from llmq.methods import METHODS, LayerLog
from llmq.provenance import PROVENANCE_FILE, hash_tree, record, sha256_file
from llmq.safetensors_stream import ShardedWriter
from llmq.source import ModelSource, is_resident, release, torch_dtype

log = logging.getLogger("llmq")

LOG_FILE = "llmq_quantize_log.jsonl"


@dataclass
class RunStats:
    layers: int = 0
    peak_resident_layers: int = 0  # most decoder layers holding real weights at one time
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0 to record what the model feeds its decoder layers."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict[str, Any] | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden.append(hidden_states)
        if self.kwargs is None:
            self.kwargs = _by_name(self.layer, hidden_states, args, kwargs) if args else kwargs
        raise _StopForward

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the model may read attributes of its layers (e.g. attention_type)
            return getattr(self._modules["layer"], name)


def _by_name(layer: nn.Module, hidden: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments after the hidden states, all as keywords (GPT-2 passes its cache and mask
    positionally): the layer is later called with a batch of hidden states and these."""
    signature = inspect.signature(layer.forward)
    params = signature.parameters
    try:
        bound = signature.bind(hidden, *args, **kwargs)
    except TypeError:
        bound = None
    if bound is None or any(params[k].kind == inspect.Parameter.VAR_POSITIONAL for k in bound.arguments):
        raise LlmqError("cannot name the positional arguments this architecture passes its decoder layers")
    named: dict[str, Any] = {}
    for k, v in list(bound.arguments.items())[1:]:
        if params[k].kind == inspect.Parameter.VAR_KEYWORD:
            named.update(v)
        else:
            named[k] = v
    return named


def _move_resident(module: nn.Module, device: torch.device) -> None:
    """Module.to() that leaves meta (not yet loaded) tensors alone."""
    if device.type == "cpu":
        return
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is not None and t.device.type != "meta" and t.device != device:
                    store[k] = nn.Parameter(t.to(device), requires_grad=False) if isinstance(t, nn.Parameter) else t.to(device)


def _release_freed_memory_to_os() -> None:
    """Keep layer-sized buffers in their own mmaps so freeing a layer returns its memory.

    glibc raises its mmap threshold after each large free, after which layer-sized tensors
    come from the heap and fragment it: RSS then grows by about one layer per layer
    (measured by scripts/bench_memory.py).  Pinning the threshold stops that.  No-op off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def capture_inputs(model: nn.Module, source: ModelSource, arch: Arch, ids: torch.Tensor,
                   dtype: torch.dtype, device: torch.device) -> LayerInputs:
    """Run the calibration tokens up to layer 0 with only the pre-layer weights resident."""
    layers = get_module(model, arch.layers)
    head = model.get_output_embeddings()
    names = _module_names(model)
    head_name = names.get(id(head)) if head is not None else None
    # Everything outside the decoder layers except the output head (big, and not needed yet).
    outside = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()
                      if not n.startswith(arch.layers + ".") and (head_name is None or not n.startswith(head_name + "."))})
    for prefix in outside:
        source.materialize(model, prefix, dtype)
    _move_resident(model, device)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    model(input_ids=row[None].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        layers[0] = catcher.layer
        for prefix in outside:
            release(model.get_submodule(prefix))
    kwargs = {k: v for k, v in (catcher.kwargs or {}).items() if k not in ("past_key_values", "past_key_value", "cache")}
    return LayerInputs(hidden=catcher.hidden, kwargs=kwargs)


def _layer_specs(names: list[str], layer: nn.Module, prefix: str, spec: QuantSpec,
                 gguf_grid: Callable[[str, tuple[int, ...]], QuantSpec | None] | None,
                 source: ModelSource) -> dict[str, QuantSpec]:
    """The grid of each linear to quantize: the recipe's, or what the GGUF plan gives it (linears
    whose width no GGUF type holds stay in float)."""
    if gguf_grid is None:
        return {n: spec for n in names}
    specs = {}
    for n in names:
        key = source.checkpoint_key(f"{prefix}.{n}.weight") or f"{prefix}.{n}.weight"
        s = gguf_grid(key, tuple(layer.get_submodule(n).weight.shape))
        if s is not None:
            specs[n] = s
    return specs


def _targets(linears: list[str] | tuple[str, ...], skip: list[str], layer_prefix: str) -> list[str]:
    def skipped(name: str) -> bool:
        full = f"{layer_prefix}.{name}"
        return any(fnmatch.fnmatch(full, p) or fnmatch.fnmatch(name, p) or name.endswith(p) for p in skip)

    return [n for n in linears if not skipped(n)]


def _model_dtype(source: ModelSource) -> torch.dtype:
    d = getattr(source.config, "dtype", None) or getattr(source.config, "torch_dtype", None)
    if isinstance(d, torch.dtype):
        return d
    return torch_dtype(d) if isinstance(d, str) and d in ("float32", "float16", "bfloat16") else torch.float32


def quantize_model(source: ModelSource, cfg: QuantizeConfig, out: str | Path, *, overwrite: bool = False,
                   device: str = "cpu", progress: bool = True, calib_ids: torch.Tensor | None = None) -> RunStats:
    """Quantize ``source`` with ``cfg`` into the directory ``out``. See the module docstring."""
    cfg.validate()
    if cfg.format == "gguf":
        raise LlmqError("a GGUF file is written by export.quantize_to_gguf, not into a checkpoint directory")
    _release_freed_memory_to_os()
    method = METHODS[cfg.method](cfg)
    fmt = FORMATS[cfg.format_name()] if method.quantizes else None
    out_dtype = torch_dtype(getattr(method, "dtype", cfg.dtype))
    dev = torch.device(device)
    # Calibration runs in fp32 on CPU (fp16 matmuls are slow and lossy there); on a GPU the model dtype is fine.
    compute_dtype = torch.float32 if dev.type == "cpu" else _model_dtype(source)

    model = source.skeleton(compute_dtype)
    missing = [n for n, _ in model.named_parameters() if not source.has_tensor(n)]
    if missing:
        raise LlmqError(f"the checkpoint of {source.name!r} lacks {len(missing)} of the model's weights (first: {missing[0]})")
    arch = arch_for(model)
    tabled = not arch.discovered  # else every layer's wiring is traced from its own linears
    layers = get_module(model, arch.layers)
    context = getattr(source.config, "max_position_embeddings", None)
    seqlen = cfg.calibration.seqlen or min(method.default_seqlen, context or method.default_seqlen)
    if context is not None and seqlen > context:
        raise LlmqError(f"--seqlen {seqlen} exceeds the model's context length {context}")
    cfg.calibration.seqlen = seqlen
    spec = cfg.spec()
    if fmt is not None:
        fmt.check(spec)
    gguf_grid = None
    if cfg.gguf_type and method.quantizes:  # the staging run of a GGUF file: types per tensor
        from llmq.gguf_plan import gguf_config, linear_grids

        gguf_grid = linear_grids(gguf_config(source), cfg.gguf_type)

    inputs: LayerInputs | None = None
    if method.needs_calibration and calib_ids is None:
        from llmq.data import calibration_tokens

        calib = cfg.calibration
        calib.dataset = calib.dataset or method.default_dataset
        calib_ids = calibration_tokens(load_tokenizer(source), calib.dataset, calib.nsamples, seqlen, calib.seed, calib.split)

    output = OutputDir(out, overwrite=overwrite)
    stats = RunStats(layers=len(layers))
    t_start = time.perf_counter()
    with output as tmp:
        writer = ShardedWriter(tmp, parse_size(cfg.max_shard_size))
        if method.needs_calibration:
            assert calib_ids is not None
            inputs = capture_inputs(model, source, arch, calib_ids, compute_dtype, dev)

        n_targets = [len(_targets(arch.linears() if tabled else layer_linears(layer), cfg.skip, f"{arch.layers}.{i}"))
                     if method.quantizes else 0 for i, layer in enumerate(layers)]
        bar = tqdm(total=sum(max(1, n) for n in n_targets), desc="quantize", unit="module", disable=not progress, dynamic_ncols=True)
        quantized_names: list[str] = []
        natural = True  # every packed g_idx is i // group_size (no reordering for runtimes to do)
        for i in range(len(layers)):
            prefix = f"{arch.layers}.{i}"
            bar.set_postfix_str(f"layer {i + 1}/{len(layers)} load")
            layer = source.materialize(model, prefix, compute_dtype)
            _move_resident(layer, dev)
            if not tabled and set(layer_linears(layer)) != set(arch.linears()):
                # A stack whose layers differ (dense first layers, then mixture-of-experts ones): start over.
                arch = Arch(layers=arch.layers, sequential=(layer_linears(layer),), discovered=True)
            if arch.discovered and inputs is not None:
                # No table for this family: learn its wiring from one forward of the first layer.
                arch = trace_arch(arch, layer, inputs.first_batch(), inputs.kwargs)
                log.info("traced the layer wiring of %s: groups %s; AWQ scaling groups %s",
                         getattr(source.config, "model_type", "?"), [list(g) for g in arch.sequential],
                         [f"{g.prev} -> {', '.join(g.linears)}" for g in arch.scaling] or "none")
            stats.peak_resident_layers = max(stats.peak_resident_layers, sum(is_resident(l) for l in layers))

            targets = _layer_specs(_targets(arch.linears(), cfg.skip, prefix), layer, prefix, spec, gguf_grid, source) if method.quantizes else {}
            layer_log = LayerLog(layer=i)
            done = 0

            def on_record(module: str) -> None:
                nonlocal done
                done += 1
                bar.update(1)
                bar.set_postfix_str(f"layer {i + 1}/{len(layers)} {module}")

            layer_log.listener = on_record
            qts = method.quantize_layer(layer, arch, targets, inputs, layer_log)
            bar.update(max(0, max(1, n_targets[i]) - done))
            stats.records.extend(layer_log.records)

            if inputs is not None and i + 1 < len(layers):
                bar.set_postfix_str(f"layer {i + 1}/{len(layers)} forward")
                inputs.advance(layer)

            packed = {f"{name}.weight": fmt.pack(qt) for name, qt in qts.items()} if fmt else {}
            natural = natural and all(natural_g_idx(qt) for qt in qts.values())
            # Tensors keep the source checkpoint's names, so whatever loads the source loads this.
            for name, t in layer.state_dict().items():
                key = source.checkpoint_key(f"{prefix}.{name}")
                if key is None:
                    continue  # a derived buffer, not stored in the checkpoint
                if name in packed:
                    for suffix, tensor in packed[name].items():
                        writer.add(key[: -len("weight")] + suffix, tensor)
                else:
                    writer.add(key, source.stored(f"{prefix}.{name}", _cast(t, out_dtype)))
            quantized_names.extend(f"{prefix}.{n}" for n in qts)
            release(layer)
        bar.close()

        # The rest of the checkpoint (embeddings, final norm, head), one tensor at a time.
        layer_prefix = arch.layers + "."
        for name, param in model.named_parameters():
            if name.startswith(layer_prefix) or name in source.tied:
                continue
            writer.add(source.checkpoint_key(name) or name, source.stored(name, _cast(source.load_tensor(name), out_dtype)))
        writer.finish()

        qcfg = None
        if fmt is not None:
            qcfg = fmt.quantization_config(spec, {
                "act_order": cfg.act_order, "static_groups": cfg.static_groups or cfg.act_order,
                "true_sequential": cfg.true_sequential, "damp": cfg.damp, "method": cfg.method,
                "natural_g_idx": natural, "version": llmq.__version__, "ignore": unquantized_linears(model, source, set(quantized_names)),
            })
        write_config(source.dir, tmp, str(out_dtype).removeprefix("torch."), qcfg)
        copy_sidecars(source.dir, tmp)
        with open(tmp / LOG_FILE, "w") as f:
            for r in stats.records:
                f.write(json.dumps(r) + "\n")
        stats.seconds = time.perf_counter() - t_start
        prov = record(source.name, source.revision,
                      {str(p.relative_to(source.dir)): sha256_file(p) for p in source.files()},
                      {**cfg.to_dict(), "quantized_modules": len(quantized_names)}, hash_tree(tmp))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n")
    stats.output = output.path
    return stats


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.dir, trust_remote_code=source.trust_remote_code)
    except Exception as e:
        raise LlmqError(f"cannot load the tokenizer of {source.name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
