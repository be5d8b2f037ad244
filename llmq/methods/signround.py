"""Learned rounding (SignRound, Cheng et al., 2023; Intel's AutoRound).

Rounding to nearest, or GPTQ, decides every code from one linear at a time.  Learned rounding looks at
the whole decoder layer: each weight may move to a neighbouring code, and each group's scale may
change,

    code = nearest(u + v * step, s0 * exp(t)),   v in [-1/2, 1/2] per weight, t per group,

where u is the value the starting codes were rounded from (the weight for ``start: rtn``, as AutoRound
starts; GPTQ's error-compensated weight for ``start: gptq``), so v = t = 0 gives the starting codes.
v and t of all the layer's linears are trained together by signed gradient descent (straight-through
estimates through the rounding) on the mean squared error between the quantized layer's output and the
unquantized model's output (its activations carried along, as GPTQ's fp_targets), with a learning rate
that decays linearly to zero; the result is kept only if it lowers that error over all calibration
windows.  t is learned on integer grids only, whose formats store free float scales (a GGUF block's are
themselves quantized: there only v moves), and the scales are rounded to what the format stores at
every step, so the codes stay exactly on the grid a format stores: integer grids and GGUF block types
alike (not NF4/FP4, whose values are not evenly spaced: those linears keep GPTQ's codes).

Measured (eval/results/signround.md): from RTN with learned scales, W3 on llmq-ref-6m has AutoRound's KL
(0.00110); started from GPTQ's codes no step lowers a layer's error there (the STE's full-step flips
undo GPTQ's optimum).  Scales are then tuned end to end by llmq.tune.

Each step takes ``batch`` consecutive windows and adds the gradients of the run's batches of windows in
float64 in order, so the result does not depend on how windows are split between the processes of a
distributed run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from llmq.activations import LayerInputs, layer_hidden
from llmq.dtypes import autocast_bf16
from llmq.errors import LlmqError
from llmq.grid import IntGrid
from llmq.heap import step_buffers_from_heap
from llmq.methods.base import LayerLog
from llmq.methods.gptq import GPTQ, GPTQOptions
from llmq.methods.rtn import RTN
from llmq.qtensor import QuantizedTensor, group_sum


@dataclass(frozen=True)
class SignRoundOptions(GPTQOptions):
    fp_targets: float = 1.0  # GPTQ's start fitted to the unquantized model's outputs (lowered KL at every width measured)
    iters: int = 200  # signed-gradient steps per decoder layer (0: the start's codes)
    lr: float = 0.0  # step of v per iteration at the start, decaying linearly to 0 (0: 1 / iters)
    batch: int = 8  # calibration windows per step
    # Step on the sign of a running average of the gradients (signum, this weight) instead of each step's own
    # (0, AutoRound's).  0.9 lowered llmq-ref-6m's W3/W2 KL by 11-13% after tuning and raised stories260K's W4
    # by 16% (eval/results/signround.md): not the default.
    momentum: float = 0.0
    scales: bool = True  # learn each group's scale too, on integer grids (AutoRound learns its clip range)
    # Where learning starts: GPTQ's codes (with fp_targets), or round-to-nearest as AutoRound starts.
    start: str = "rtn"
    # Products of the learning steps in bf16 (autocast; the accept test stays in the layer's dtype): auto where
    # they run on bf16 units (a GPU, a CPU with AMX/AVX512-BF16), as AutoRound does by default.
    learn_dtype: str = "auto"

    def validate(self) -> None:
        super().validate()
        if self.iters < 0:
            raise LlmqError(f"iters must be >= 0, got {self.iters}")
        if self.lr < 0:
            raise LlmqError(f"lr must be >= 0, got {self.lr}")
        if self.batch <= 0:
            raise LlmqError(f"batch must be positive, got {self.batch}")
        if not 0 <= self.momentum < 1:
            raise LlmqError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.refit_scales:
            raise LlmqError("refit_scales is gptq's: signround learns its codes on the scales GPTQ rounded with")
        if self.start not in ("gptq", "rtn"):
            raise LlmqError(f"signround start must be gptq or rtn, got {self.start!r}")
        if self.learn_dtype not in ("auto", "bfloat16", "float32"):
            raise LlmqError(f"learn_dtype must be auto, bfloat16 or float32, got {self.learn_dtype!r}")


@dataclass
class Rounding:
    """One linear's learnable rounding: code = nearest(base + v * step) on the grid, and on integer grids
    (whose per-group scales the formats store as free floats) a learned log-factor t of each group's scale."""

    qt: QuantizedTensor  # the starting codes and the grid parameters, kept
    base: torch.Tensor  # (out, in) fp32: what the starting codes were rounded from
    scale0: torch.Tensor  # (out, groups) the starting scales, on the layer's device
    zero: torch.Tensor  # per column (out, in)
    offset: torch.Tensor | None
    step: torch.Tensor  # per column: the starting grid's spacing
    v: torch.Tensor  # (out, in) fp32
    t: torch.Tensor | None  # (out, groups) fp32; None where scales stay (block grids: their scales are quantized)
    # Exponential averages of the gradients of v and t whose signs are stepped on (with momentum > 0)
    avg_v: torch.Tensor | None = None
    avg_t: torch.Tensor | None = None
    group: int = 0  # qt.group_width: groups of consecutive columns (0: act-order's permutation)

    @staticmethod
    def start(qt: QuantizedTensor, base: torch.Tensor, device: torch.device, scales: bool = False) -> "Rounding":
        g = qt.g_idx.long()
        scale, zero = qt.scales[:, g].to(device), qt.zeros[:, g].float().to(device)
        offset = None if qt.offsets is None else qt.offsets[:, g].to(device)
        step = qt.grid.value(zero + 1, scale, zero, offset) - qt.grid.value(zero, scale, zero, offset)
        base = base.to(device=device, dtype=torch.float32)
        scale0 = qt.scales.to(device=device, dtype=torch.float32)
        t = torch.zeros_like(scale0) if scales and isinstance(qt.grid, IntGrid) and offset is None else None
        return Rounding(qt, base, scale0, zero, offset, step, torch.zeros_like(base), t, group=qt.group_width)

    def scales(self) -> torch.Tensor:
        """The group scales as the format stores them (t = 0: the starting ones, exactly)."""
        if self.t is None:
            return self.scale0
        return self.qt.grid.stored(self.scale0 * self.t.exp())

    def _rounded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, s, q): the value rounded, each column's scale and the code, at the current v and t."""
        x = self.base + self.v * self.step
        s = self._column_scales()
        return x, s, self.qt.grid.nearest(x, s, self.zero, self.offset)

    def _column_scales(self) -> torch.Tensor:
        """Each column's scale (out, in), from its group's."""
        if self.group:
            return self.scales().repeat_interleave(self.group, 1)
        return self.scales()[:, self.qt.g_idx.long().to(self.scale0.device)]

    def codes(self) -> torch.Tensor:
        return self._rounded()[2]

    def weight(self) -> torch.Tensor:
        """The quantized weight at the current v.  Rounding passes gradients straight through, so
        d loss / d v = d loss / d weight * step."""
        _, s, q = self._rounded()
        return self.qt.grid.value(q, s, self.zero, self.offset)

    def scale_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """d loss / d t from ``grad`` = d loss / d weight.  w = s (q - z) with q = round(x / s) + z passed
        straight through: dw/ds = q - z - x / s inside the grid's range, q - z where clamped; d/dt = s d/ds,
        summed over each group's columns."""
        s = self._column_scales()
        xs = (self.base + self.v * self.step) / s
        unclamped = torch.round(xs) + self.zero  # (grid.nearest's code before its clamp)
        q = unclamped.clamp(0, self.qt.grid.maxq)
        dw_dt = (q - self.zero - torch.where(q == unclamped, xs, 0)).mul_(s).mul_(grad)
        return group_sum(dw_dt, self.group, self.qt.g_idx, self.t.shape[1])

    def step_by_sign(self, grad: torch.Tensor, lr: float, momentum: float = 0.0) -> None:
        """One signed-gradient step of v (and t) from ``grad`` = d loss / d weight: on the sign of this
        gradient, or with ``momentum`` of its running average (signum)."""
        grad = grad.float()  # (summed in float64 over batches and ranks; its signs need no more)
        if self.t is not None:  # (before v moves: the derivative is taken where grad was)
            g = self.scale_gradient(grad)
            if momentum:
                g = self.avg_t = _average(self.avg_t, g, momentum)
            self.t.sub_(lr * torch.sign(g))
        g = grad * self.step
        if momentum:
            g = self.avg_v = _average(self.avg_v, g, momentum)
        self.v.sub_(lr * torch.sign(g)).clamp_(-0.5, 0.5)

    def reset(self) -> None:
        self.v.zero_()
        if self.t is not None:
            self.t.zero_()
        self.avg_v = self.avg_t = None

    def result(self) -> QuantizedTensor:
        return QuantizedTensor.from_float_codes(self.codes().cpu(), self.scales().cpu(), self.qt.zeros, self.qt.g_idx,
                                                self.qt.grid, self.qt.offsets, self.qt.stored)


class SignRound(GPTQ):
    name = "signround"
    Options = SignRoundOptions

    def follows_unquantized(self) -> bool:
        return True  # the unquantized model's activations are what the codes learn to give

    def quantize_layer(self, layer, arch, targets, inputs, log):
        if inputs is None:
            raise LlmqError("signround needs calibration data")
        result, base = self._start(layer, arch, targets, inputs, log)
        inputs.reuse = None  # (what GPTQ's passes kept is stale once the codes move)
        wanted = self._fp_hidden  # (the start leaves the unquantized layer's outputs there)
        t0 = time.perf_counter()
        device = next(layer.parameters()).device
        learn = {n: Rounding.start(qt, base[n], device, self.options.scales) for n, qt in result.items()
                 if qt.grid.uniform and n in base}
        if self.options.iters == 0 or not learn:
            return result
        with step_buffers_from_heap():  # (the pipeline gives buffers from 1 MiB fresh mmaps: a page fault storm per step)
            start, end = self._train(layer, learn, inputs, wanted, log)
        seconds = time.perf_counter() - t0
        for name, r in learn.items():
            qt = r.result()
            linear = layer.get_submodule(name)
            linear.weight.data = qt.dequantize(linear.weight.dtype).to(linear.weight.device)
            changed = float((qt.codes != r.qt.codes).float().mean())
            _annotate(log, name, codes_changed=round(changed, 6), layer_mse_start=start, layer_mse_learned=end,
                      layer_mse=min(start, end), rounding_seconds=round(seconds, 3))
            result[name] = qt
        return result

    def _start(self, layer, arch, targets, inputs, log) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
        """The starting codes, and per linear what they were rounded from; self._fp_hidden then holds
        the unquantized layer's outputs.  Grids learning cannot move on (NF4/FP4) start, and stay, at GPTQ's."""
        rtn = {n: g for n, g in targets.items() if g.uniform} if self.options.start == "rtn" else {}
        self.updated = {}
        # (GPTQ first: it copies the unquantized layer and leaves its outputs in _fp_hidden, with no targets too)
        result = super().quantize_layer(layer, arch, {n: g for n, g in targets.items() if n not in rtn}, inputs, log)
        base, self.updated = self.updated, None
        base.update({name: layer.get_submodule(name).weight.data.float().cpu() for name in rtn})
        result.update(RTN().quantize_layer(layer, arch, rtn, None, log))
        for name in rtn:
            _annotate(log, name, start="rtn")
        return result, base

    @torch.no_grad()
    def _train(self, layer: nn.Module, learn: dict[str, Rounding], inputs: LayerInputs,
               wanted: list[torch.Tensor], log: LayerLog) -> tuple[float, float]:
        """Signed gradient descent on every v and t; leaves them in place if they lowered the layer's output
        MSE over all windows (else 0).  Returns that MSE at the start and after learning.

        Steps draw their windows from the whole run's (every rank alike); a rank works on those it
        holds, and the gradients are summed over the ranks."""
        o = self.options
        mine = range(inputs.offset, inputs.offset + len(inputs.hidden))
        n = sum(self.ranks.gather_objects(len(mine)))
        gen = torch.Generator().manual_seed(self.seed)
        lr0 = o.lr or 1.0 / o.iters
        rounds = list(learn.values())
        per_window = wanted[0].numel()
        bf16 = autocast_bf16(o.learn_dtype, next(layer.parameters()).device)
        start = self._loss(layer, learn, inputs, wanted, n * per_window)
        for it in range(o.iters):
            if it % 10 == 0:
                log.say(f"learned rounding step {it}/{o.iters}")
            block = int(torch.randint(-(-n // o.batch), (1,), generator=gen))  # (consecutive windows: batched below)
            windows = range(block * o.batch, min(n, (block + 1) * o.batch))
            grads = self._sum(self._gradient(layer, learn, inputs, wanted, [i for i in windows if i in mine],
                                             len(windows) * per_window, bf16))
            lr = lr0 * (1 - it / o.iters)
            for r, g in zip(rounds, grads):
                r.step_by_sign(g, lr, o.momentum)
        end = self._loss(layer, learn, inputs, wanted, n * per_window)
        if end >= start:  # (on all windows) learning did not pay off: keep the starting codes
            for r in rounds:
                r.reset()
        return start, end

    def _loss(self, layer: nn.Module, learn: dict[str, Rounding], inputs: LayerInputs, wanted: list[torch.Tensor],
              numel: int) -> float:
        """The layer's output MSE at the current v over all windows (of every rank)."""
        dtype = next(layer.parameters()).dtype
        weights = {f"{name}.weight": r.weight().to(dtype) for name, r in learn.items()}
        sse = []
        for i in range(0, len(inputs.hidden), inputs.batch_size):
            x = torch.cat(inputs.hidden[i : i + inputs.batch_size])
            out = layer_hidden(functional_call(layer, weights, (x,), inputs.kwargs))
            sse.append(float((out.float() - torch.cat(wanted[i : i + inputs.batch_size]).float()).pow(2).sum()))
        # Every rank's batches in run order, added one by one: the same sum as in one process.
        return sum(e for part in self.ranks.gather_objects(sse) for e in part) / numel

    def _sum(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gradients summed over the ranks (one message)."""
        if self.ranks.world == 1:
            return grads
        flat = self.ranks.sum(torch.cat([g.flatten() for g in grads]))
        return [p.view_as(g) for p, g in zip(flat.split([g.numel() for g in grads]), grads)]

    def _gradient(self, layer: nn.Module, learn: dict[str, Rounding], inputs: LayerInputs, wanted: list[torch.Tensor],
                  windows: list[int], numel: int, bf16: bool) -> list[torch.Tensor]:
        """d(mean squared output error)/d(weight) of every learned linear over ``windows`` (indices among
        the run's).  They go through the layer in the batches the run numbers alike on every rank, each
        batch's gradient added in float64 in order: the same sum however windows are shared out."""
        dtype = next(layer.parameters()).dtype
        device = next(layer.parameters()).device
        weights = {f"{name}.weight": r.weight().to(dtype).requires_grad_() for name, r in learn.items()}
        total = [torch.zeros_like(r.v, dtype=torch.float64) for r in learn.values()]
        batches: dict[int, list[int]] = {}
        for i in windows:
            batches.setdefault(i // inputs.batch_size, []).append(i - inputs.offset)
        for local in batches.values():
            x = torch.cat([inputs.hidden[i] for i in local])
            with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = layer_hidden(functional_call(layer, weights, (x,), inputs.kwargs))
                err = (out.float() - torch.cat([wanted[i] for i in local]).float()).pow(2).sum() / numel
                grads = torch.autograd.grad(err, list(weights.values()), allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t += g.to(torch.float64)
        return total


def _average(avg: torch.Tensor | None, g: torch.Tensor, momentum: float) -> torch.Tensor:
    """The running average avg·m + g·(1 − m), from avg = 0."""
    return (torch.zeros_like(g) if avg is None else avg).mul_(momentum).add_(g, alpha=1 - momentum)


def _annotate(log, module: str, **info) -> None:
    """Add to the record the GPTQ stage wrote for ``module`` (one record per module keeps progress exact)."""
    for record in log.records:
        if record.get("module") == module:
            record.update(info)
