"""Learned rounding (SignRound, Cheng et al., 2023; Intel's AutoRound), started from GPTQ.

GPTQ decides every code from a layer-wise quadratic model of one linear at a time.  Learned
rounding then looks at the whole decoder layer: each weight may move to a neighbouring code,

    code = nearest(u + v * step),   v in [-1/2, 1/2] learned per weight,

where u is the value GPTQ rounded (its error-compensated weight: v = 0 gives GPTQ's codes) and
``step`` the grid's spacing there.  The v of all the layer's linears are trained together by signed
gradient descent (a straight-through estimate through the rounding) on the mean squared error
between the quantized layer's output and the unquantized model's output (its activations carried
along, GPTQ's fp_targets), with a learning rate that decays linearly to zero; the learned codes are
kept only if they lower that error over all calibration windows.  Scales and zeros stay GPTQ's, so
the codes stay exactly on the grid a format stores: integer grids and GGUF block types alike (not
NF4/FP4, whose values are not evenly spaced).

Measured (eval/results/stories260K-equal-layout-and-signround.md): on stories260K W3 g32 it lowers the
KL from GPTQ-with-fp_targets-and-refit's 0.357 to 0.284; on llmq-ref-6m no layer kept a learned code, so
the file is GPTQ's.  Scales are tuned afterwards by llmq.tune (end to end), not here.

Each step's gradient is a sum of per-window gradients added in float64 in window order, so the
result does not depend on how windows are split between the processes of a distributed run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from llmq.activations import LayerInputs, layer_hidden
from llmq.errors import LlmqError
from llmq.methods.base import LayerLog
from llmq.methods.gptq import GPTQ, GPTQOptions
from llmq.qtensor import QuantizedTensor


@dataclass(frozen=True)
class SignRoundOptions(GPTQOptions):
    fp_targets: float = 1.0  # GPTQ's start fitted to the unquantized model's outputs (lowered KL at every width measured)
    iters: int = 200  # signed-gradient steps per decoder layer (0: plain GPTQ)
    lr: float = 0.0  # step of v per iteration at the start, decaying linearly to 0 (0: 1 / iters)
    batch: int = 8  # calibration windows per step

    def validate(self) -> None:
        super().validate()
        if self.iters < 0:
            raise LlmqError(f"iters must be >= 0, got {self.iters}")
        if self.lr < 0:
            raise LlmqError(f"lr must be >= 0, got {self.lr}")
        if self.batch <= 0:
            raise LlmqError(f"batch must be positive, got {self.batch}")
        if self.refit_scales:
            raise LlmqError("refit_scales is gptq's: signround learns its codes on the scales GPTQ rounded with")


@dataclass
class Rounding:
    """One linear's learnable rounding: code = nearest(base + v * step) on fixed grid parameters."""

    qt: QuantizedTensor  # the starting codes and the grid parameters, kept
    base: torch.Tensor  # (out, in) fp32: what the starting codes were rounded from
    scale: torch.Tensor  # per column (out, in), on the layer's device
    zero: torch.Tensor
    offset: torch.Tensor | None
    step: torch.Tensor
    v: torch.Tensor  # (out, in) fp32

    @staticmethod
    def start(qt: QuantizedTensor, base: torch.Tensor, device: torch.device) -> "Rounding":
        g = qt.g_idx.long()
        scale, zero = qt.scales[:, g].to(device), qt.zeros[:, g].float().to(device)
        offset = None if qt.offsets is None else qt.offsets[:, g].to(device)
        step = qt.grid.value(zero + 1, scale, zero, offset) - qt.grid.value(zero, scale, zero, offset)
        base = base.to(device=device, dtype=torch.float32)
        return Rounding(qt, base, scale, zero, offset, step, torch.zeros_like(base))

    def codes(self) -> torch.Tensor:
        return self.qt.grid.nearest(self.base + self.v * self.step, self.scale, self.zero, self.offset)

    def weight(self) -> torch.Tensor:
        """The quantized weight at the current v.  Rounding passes gradients straight through, so
        d loss / d v = d loss / d weight * step."""
        return self.qt.grid.value(self.codes(), self.scale, self.zero, self.offset)

    def result(self) -> QuantizedTensor:
        return QuantizedTensor.from_float_codes(self.codes().cpu(), self.qt.scales, self.qt.zeros, self.qt.g_idx,
                                                self.qt.grid, self.qt.offsets, self.qt.stored)


class SignRound(GPTQ):
    name = "signround"
    Options = SignRoundOptions

    def follows_unquantized(self) -> bool:
        return True  # the unquantized model's activations are what the codes learn to give

    def quantize_layer(self, layer, arch, targets, inputs, log):
        if inputs is None:
            raise LlmqError("signround needs calibration data")
        self.updated = {}
        result = super().quantize_layer(layer, arch, targets, inputs, log)
        inputs.reuse = None  # (what GPTQ's passes kept is stale once the codes move)
        wanted = self._fp_hidden  # (GPTQ leaves the unquantized layer's outputs there)
        t0 = time.perf_counter()
        device = next(layer.parameters()).device
        learn = {n: Rounding.start(qt, self.updated[n], device) for n, qt in result.items()
                 if qt.grid.uniform and n in self.updated}
        self.updated = None
        if self.options.iters == 0 or not learn:
            return result
        start, end = self._train(layer, learn, inputs, wanted, log)
        seconds = time.perf_counter() - t0
        for name, r in learn.items():
            qt = r.result()
            linear = layer.get_submodule(name)
            linear.weight.data = qt.dequantize(linear.weight.dtype).to(linear.weight.device)
            changed = float((qt.codes != r.qt.codes).float().mean())
            _annotate(log, name, codes_changed=round(changed, 6), layer_mse_start=start, layer_mse=end,
                      rounding_seconds=round(seconds, 3))
            result[name] = qt
        return result

    @torch.no_grad()
    def _train(self, layer: nn.Module, learn: dict[str, Rounding], inputs: LayerInputs,
               wanted: list[torch.Tensor], log: LayerLog) -> tuple[float, float]:
        """Signed gradient descent on every v; leaves v in place if it lowered the layer's output MSE
        over all windows (else v = 0).  Returns that MSE at the start (GPTQ's codes) and at the end.

        Steps draw their windows from the whole run's (every rank alike); a rank works on those it
        holds, and the gradients are summed over the ranks."""
        o = self.options
        mine = range(inputs.offset, inputs.offset + len(inputs.hidden))
        n = sum(self.ranks.gather_objects(len(mine)))
        gen = torch.Generator().manual_seed(self.seed)
        lr0 = o.lr or 1.0 / o.iters
        rounds = list(learn.values())
        per_window = wanted[0].numel()
        start = self._loss(layer, learn, inputs, wanted, n * per_window)
        for it in range(o.iters):
            if it % 10 == 0:
                log.say(f"learned rounding step {it}/{o.iters}")
            windows = torch.randperm(n, generator=gen)[: o.batch].sort().values.tolist()
            grads = self._sum(self._gradient(layer, learn, inputs, wanted, [i - mine.start for i in windows if i in mine],
                                             len(windows) * per_window))
            lr = lr0 * (1 - it / o.iters)
            for r, g in zip(rounds, grads):
                r.v.sub_(lr * torch.sign(g * r.step)).clamp_(-0.5, 0.5)
        end = self._loss(layer, learn, inputs, wanted, n * per_window)
        if end >= start:  # (on all windows) learning did not pay off: keep the starting codes
            for r in rounds:
                r.v.zero_()
        return start, min(start, end)

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

    def _gradient(self, layer: nn.Module, learn: dict[str, Rounding], inputs: LayerInputs,
                  wanted: list[torch.Tensor], windows: list[int], numel: int) -> list[torch.Tensor]:
        """d(mean squared output error)/d(weight) of every learned linear over ``windows``, each
        window's gradient added in float64 in order."""
        dtype = next(layer.parameters()).dtype
        weights = {f"{name}.weight": r.weight().to(dtype).requires_grad_() for name, r in learn.items()}
        total = [torch.zeros_like(r.v, dtype=torch.float64) for r in learn.values()]
        for i in windows:
            with torch.enable_grad():  # (callers switch gradients off)
                out = layer_hidden(functional_call(layer, weights, (inputs.hidden[i],), inputs.kwargs))
                err = (out.float() - wanted[i].float()).pow(2).sum() / numel
                grads = torch.autograd.grad(err, list(weights.values()), allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t += g.to(torch.float64)
        return total


def _annotate(log, module: str, **info) -> None:
    """Add to the record the GPTQ stage wrote for ``module`` (one record per module keeps progress exact)."""
    for record in log.records:
        if record.get("module") == module:
            record.update(info)
