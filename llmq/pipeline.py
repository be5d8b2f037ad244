"""Layer-streaming quantization.

    plan (resolve the recipe) -> capture the inputs of layer 0 -> for each decoder layer:
        load its weights from disk -> let the method calibrate and quantize its linears
        -> run the quantized layer to get the next layer's inputs -> emit its tensors to the sink -> free it
    -> emit what no layer holds (embeddings, final norm, head) -> finish the output

Only one decoder layer's weights are ever resident; embeddings are read for the capture and
dropped, the rest of the checkpoint is copied tensor by tensor.  The sink is the output format:
a safetensors checkpoint directory or a GGUF file, fed the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmq.activations import LayerInputs, batch_windows, capture_inputs
from llmq.allocate import Allocation, allocate, budget_bytes
from llmq.arch import Arch, arch_for, get_module, layer_linears, trace_arch
from llmq.config import QuantizeConfig
from llmq.data import calibration_tokens
from llmq.distributed import Ranks
from llmq.errors import LlmqError
from llmq.formats import FORMATS
from llmq.gguf.writer import GGUFSink
from llmq.heap import LAYER_BUFFERS, pin_mmap_threshold
from llmq.journal import Journal, LayerEntry
from llmq.methods import LayerLog, Method
from llmq.rounding import rtn_quantize
from llmq.plan import RunPlan, check_rules_on, head_grid, resolve
from llmq.prefetch import LayerPrefetch
from llmq.projection import parameter_count
from llmq.qtensor import QuantizedTensor
from llmq.sinks import CheckpointSink, Follower, Sink, emit_rest
from llmq.source import ModelSource, is_resident, move_resident, release

log = logging.getLogger("llmq")


@dataclass
class RunStats:
    layers: int = 0
    peak_resident_layers: int = 0  # most decoder layers holding real weights at one time
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None
    quantized: int = 0  # linears quantized
    grid: str | None = None  # the recipe's grid (None: a cast or a GGUF file, which plans a type per tensor)
    notes: list[str] = field(default_factory=list)  # tensors a file format stores otherwise than planned
    allocation: Allocation | None = None  # what --target-size / --target-bpw chose


@dataclass
class _Run:
    """What every layer step shares."""

    plan: RunPlan
    source: ModelSource
    model: nn.Module
    method: Method
    sink: Sink
    device: torch.device
    arch: Arch
    tabled: bool  # the family has a table; else each layer's wiring is traced (layers may differ: dense, then MoE)
    inputs: LayerInputs | None
    bar: Any
    per_layer: list[int]  # modules each layer quantizes, for the progress display
    stats: RunStats
    prefetch: LayerPrefetch  # the next layer read while this one computes (GPU runs)


def quantize_model(source: ModelSource, cfg: QuantizeConfig, out: str | Path, *, overwrite: bool = False,
                   device: str = "cpu", progress: bool = True, calib_ids: torch.Tensor | None = None,
                   resume: bool = False, ranks: Ranks = Ranks()) -> RunStats:
    """Quantize ``source`` with ``cfg`` into ``out`` (a directory, or a .gguf file). See the module docstring.
    ``resume``: continue the interrupted run of the same settings into ``out`` (llmq.journal).
    ``ranks``: this process's place in a torchrun launch (llmq.distributed); every rank calls this alike."""
    # Layer-sized buffers in their own mmaps, so that freeing a layer returns its memory: otherwise glibc
    # raises its threshold and they fragment the heap, RSS growing by about a layer per layer (bench_memory.py).
    pin_mmap_threshold(LAYER_BUFFERS)
    plan = resolve(cfg, source, device)
    model = _skeleton(source, plan)
    check_rules_on(plan, model)
    method = plan.make_method(ranks)
    _check_distributed(plan, method, ranks, resume)
    # (a GGUF file records it, and a budget sizes its header with it: taken before an allocation adds its rules)
    recipe = plan.recipe(targets=True)
    sink = open_sink(plan, source, model, out, overwrite, resume, recipe)  # (checks the output, and what a format can store, first)
    stats = RunStats(grid=None if plan.grid is None else plan.grid.name)
    ids = calib_ids if calib_ids is not None or plan.calibration is None else calibration_ids(source, plan)
    if plan.target_size is not None or plan.target_bpw is not None:
        budget = budget_bytes(plan.target_size, plan.target_bpw, parameter_count(model))
        stats.allocation = allocate(source, plan, model, method, ids, budget, torch.device(device), recipe, progress)
        plan = dataclasses.replace(plan, rules=stats.allocation.rules() + plan.rules)
        sink = open_sink(plan, source, model, out, overwrite, resume, recipe)
    if not ranks.leader:
        sink = Follower(sink)
    t0 = time.perf_counter()
    prefetch = LayerPrefetch(source, model, plan.compute_dtype, active=torch.device(device).type == "cuda")
    with sink, prefetch:  # (holds the output's lock from here on)
        run = _start(plan, source, model, method, sink, torch.device(device), ids, progress and ranks.leader, stats,
                     prefetch, ranks)
        journal = Journal(sink.work, {"recipe": plan.recipe(), "source": source.identity(), "ids": _digest(ids)}) \
            if ranks.world == 1 else None  # (a distributed run is not resumable)
        done = _resume(run, journal) if resume else 0
        for i in range(stats.layers):
            if i < done:
                _replay_layer(run, i, journal.layer(i))
                continue
            entry = _quantize_layer(run, i)
            if journal is not None:
                journal.record(i, entry, sink.state())
                sink.output.keep()  # an interrupted run leaves its finished layers for --resume
            del entry  # (its codes are in the sink: not held through the next layer)
        run.bar.close()
        run.inputs = None  # (the last layer's activations: not needed for what is left)
        if ranks.leader:
            emit_rest(sink, model, source, done=lambda name: name.startswith(run.arch.layers + "."), rtn=rtn_quantize,
                      proposed=head_grid(plan, model))
        if journal is not None:
            journal.clear()
        stats.seconds = time.perf_counter() - t0
        allocation = {} if stats.allocation is None else {"allocation": stats.allocation.record()}
        processes = {} if ranks.world == 1 else {"processes": ranks.world}
        sink.finish({**plan.recipe(), "quantized_modules": stats.quantized, **allocation, **processes}, plan.facts(),
                    stats.records)
    stats.output = sink.path
    stats.notes = sink.notes
    return stats


def _check_distributed(plan: RunPlan, method: Method, ranks: Ranks, resume: bool) -> None:
    """What a torchrun launch cannot do yet, refused on every rank before any work."""
    if ranks.world == 1:
        return
    if plan.target_size is not None or plan.target_bpw is not None:
        raise LlmqError("--target-size/--target-bpw allocate in one process only; launch without torchrun "
                        "(or save the plan with --save-recipe and run that recipe under torchrun)")
    if resume:
        raise LlmqError("--resume continues one-process runs only; launch it without torchrun")
    c = plan.calibration
    if c is None or not method.needs_calibration:
        return
    batch = batch_windows(c.seqlen)
    if -(-c.nsamples // batch) < ranks.world:
        raise LlmqError(f"{c.nsamples} calibration samples leave some of the {ranks.world} processes without any "
                        f"(each takes whole batches of {batch}); use --nsamples "
                        f"{batch * ranks.world} or more, or fewer processes")


def calibration_ids(source: ModelSource, plan: RunPlan) -> torch.Tensor:
    c = plan.calibration
    return calibration_tokens(source.tokenizer(), c.dataset, c.nsamples, c.seqlen, c.seed, c.split)


def _digest(ids: torch.Tensor | None) -> str | None:
    return None if ids is None else hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()


def _resume(run: _Run, journal: Journal) -> int:
    """Layers an interrupted run finished; the sink is cut back to the state after the last of them."""
    done, state = journal.finished()
    run.sink.restore(state)
    if done:
        log.warning("resuming after layer %d of %d", done, run.stats.layers)
    return done


def open_sink(plan: RunPlan, source: ModelSource, model: nn.Module, out: str | Path, overwrite: bool,
              resume: bool, recipe: dict) -> Sink:
    """``recipe``: what a GGUF file records of how it was made (the plan's before any allocation)."""
    inputs = [Path(plan.calibration.dataset)] if plan.calibration and Path(plan.calibration.dataset).exists() else []
    if plan.gguf is not None:
        return GGUFSink(source, model, out, plan.gguf.file_type, token_embedding_type=plan.gguf.token_embedding,
                        output_type=plan.gguf.output, overwrite=overwrite, inputs=inputs, resume=resume, rules=plan.rules,
                        recipe=recipe)
    fmt = FORMATS[plan.format].for_dtype(plan.dtype) if plan.format else None
    if fmt is not None:
        fmt.check(plan.grid)
    return CheckpointSink(source, model, fmt, plan.grid, out, dtype=plan.dtype, max_shard_bytes=plan.max_shard_bytes,
                          overwrite=overwrite, inputs=inputs, resume=resume)


def _skeleton(source: ModelSource, plan: RunPlan) -> nn.Module:
    model = source.skeleton(plan.compute_dtype)
    missing = [n for n, _ in model.named_parameters() if not source.has_tensor(n)]
    if missing:
        raise LlmqError(f"the checkpoint of {source.name!r} lacks {len(missing)} of the model's weights (first: {missing[0]})")
    return model


def _start(plan: RunPlan, source: ModelSource, model: nn.Module, method: Method, sink: Sink, device: torch.device,
           calib_ids: torch.Tensor | None, progress: bool, stats: RunStats, prefetch: LayerPrefetch,
           ranks: Ranks = Ranks()) -> _Run:
    """Capture the calibration inputs of layer 0 (this rank's share of the windows) and set up the progress display."""
    arch = arch_for(model)
    layers = get_module(model, arch.layers)
    stats.layers = len(layers)
    inputs = None
    if calib_ids is not None and method.needs_calibration:
        share = ranks.windows(len(calib_ids), batch_windows(calib_ids.shape[-1]))
        inputs = capture_inputs(model, source, arch, calib_ids[share], plan.compute_dtype, device)
        inputs.offset = share.start
    per_layer = [len(_targets(layer_linears(layer) if arch.discovered else arch.linears(), plan, f"{arch.layers}.{i}"))
                 for i, layer in enumerate(layers)]
    bar = tqdm(total=sum(max(1, n) for n in per_layer), desc="quantize", unit="module", disable=not progress,
               dynamic_ncols=True)
    return _Run(plan, source, model, method, sink, device, arch, not arch.discovered, inputs, bar, per_layer, stats,
                prefetch)


def _quantize_layer(run: _Run, i: int) -> LayerEntry:
    """Load, calibrate and quantize, advance the inputs, emit, free: one decoder layer.  Returns what the
    journal keeps of it."""
    layers = get_module(run.model, run.arch.layers)
    prefix = f"{run.arch.layers}.{i}"
    run.bar.set_postfix_str(f"layer {i + 1}/{len(layers)} load")
    layer = run.source.materialize(run.model, prefix, run.plan.compute_dtype, run.prefetch.take(prefix))
    move_resident(layer, run.device)
    if i + 1 < len(layers):
        run.prefetch.start(f"{run.arch.layers}.{i + 1}")
    run.arch = _layer_arch(run, layer)
    run.stats.peak_resident_layers = max(run.stats.peak_resident_layers, sum(is_resident(l) for l in layers))

    targets = {}
    if run.plan.quantizes:
        for name in _targets(run.arch.linears(), run.plan, prefix):
            grid = run.sink.grid_for(f"{prefix}.{name}.weight", tuple(layer.get_submodule(name).weight.shape),
                                     run.plan.grid_of(f"{prefix}.{name}"))
            if grid is not None:
                targets[name] = grid
    layer_log = LayerLog(layer=i)
    done = 0

    def on_record(module: str) -> None:
        nonlocal done
        done += 1
        run.bar.update(1)
        run.bar.set_postfix_str(f"layer {i + 1}/{len(layers)} {module}")

    layer_log.listener = on_record
    layer_log.status = lambda text: run.bar.set_postfix_str(f"layer {i + 1}/{len(layers)} {text}")
    qts = run.method.quantize_layer(layer, run.arch, targets, run.inputs, layer_log)
    run.bar.update(max(0, max(1, run.per_layer[i]) - done))
    run.stats.records.extend(layer_log.records)
    run.stats.quantized += len(qts)
    if run.inputs is not None and i + 1 < len(layers):
        run.bar.set_postfix_str(f"layer {i + 1}/{len(layers)} forward")
        run.inputs.advance(layer)
    _emit_layer(run, layer, prefix, qts)
    targets = {f"{n}.weight" for n in qts}
    floats = {n: p.detach().cpu().clone() for n, p in layer.named_parameters() if n not in targets}
    release(layer)
    return LayerEntry(qts, floats, layer_log.records)


def _replay_layer(run: _Run, i: int, entry: LayerEntry) -> None:
    """A layer an interrupted run finished: put back what it left (no calibration, no rounding) and run it
    to get the next layer's inputs, exactly as the interrupted run computed them."""
    layers = get_module(run.model, run.arch.layers)
    run.bar.set_postfix_str(f"layer {i + 1}/{len(layers)} replay")
    layer = run.source.materialize(run.model, f"{run.arch.layers}.{i}", run.plan.compute_dtype)
    move_resident(layer, run.device)
    run.arch = _layer_arch(run, layer)
    if run.inputs is not None:
        run.method.replay(layer, run.inputs)  # (still the unquantized layer)
    params = dict(layer.named_parameters())
    for name, qt in entry.qts.items():
        w = params[f"{name}.weight"]
        w.data = qt.dequantize(w.dtype).to(w.device)
    for name, t in entry.floats.items():
        params[name].data = t.to(params[name].device)
    if run.inputs is not None and i + 1 < len(layers):
        run.inputs.advance(layer)
    run.stats.records.extend(entry.records)
    run.stats.quantized += len(entry.qts)
    run.bar.update(max(1, run.per_layer[i]))
    release(layer)


def _layer_arch(run: _Run, layer: nn.Module) -> Arch:
    """The wiring of this layer: the table's, or traced from one forward of it for untabled families."""
    arch = run.arch
    if run.tabled:
        return arch
    if set(layer_linears(layer)) != set(arch.linears()):
        # A stack whose layers differ (dense first layers, then mixture-of-experts ones): start over.
        arch = Arch(layers=arch.layers, sequential=(layer_linears(layer),), discovered=True)
    if arch.discovered and run.inputs is not None:
        arch = trace_arch(arch, layer, run.inputs.first_batch(), run.inputs.kwargs)
        log.info("traced the layer wiring of %s: groups %s; AWQ scaling groups %s",
                 getattr(run.source.config, "model_type", "?"), [list(g) for g in arch.sequential],
                 [f"{g.prev} -> {', '.join(g.linears)}" for g in arch.scaling] or "none")
    return arch


def _emit_layer(run: _Run, layer: nn.Module, prefix: str, qts: dict[str, QuantizedTensor]) -> None:
    """Every tensor of the layer that the checkpoint stores, quantized or not, to the sink."""
    for name, t in layer.state_dict().items():
        full = f"{prefix}.{name}"
        if run.source.checkpoint_key(full) is None:
            continue  # a derived buffer, not stored in the checkpoint
        qt = qts.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if qt is None and t.ndim == 2:
            grid = run.sink.grid_for(full, tuple(t.shape), None)  # e.g. a skipped linear a GGUF plan quantizes
            qt = None if grid is None else rtn_quantize(t.float().cpu(), grid)
        run.sink.add(full, qt if qt is not None else t.cpu())


def _targets(linears: list[str] | tuple[str, ...], plan: RunPlan, layer_prefix: str) -> list[str]:
    """The linears of a layer the plan quantizes (not skipped, no rule keeping them in float)."""
    return [n for n in linears if plan.quantizes_module(f"{layer_prefix}.{n}")]
