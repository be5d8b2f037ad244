"""AWQ (Lin et al., 2023): activation-aware weight quantization.

For every group of linears that read the same input, search one per-input-channel
scale s = mean|x|^a / mean|w|^(1-a) (a on a grid in [0, 1)), keep the a whose
quantized block reproduces the unquantized block's output best, and fold s into the
op that produces the input (a norm or a linear), so the fp function is unchanged:
    prev(x) / s  ->  (W * s) (x / s) = W x.
Then search, per output channel and group, how far to shrink the weight range before
rounding (clipping), skipping q/k whose errors the softmax amplifies.  The scaled and
clipped weights are finally rounded (RTN) or handed to GPTQ (awq+gptq).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmq.activations import LayerInputs, layer_hidden
from llmq.arch import Arch, ScaleGroup, first_param
from llmq.distributed import Ranks
from llmq.errors import LlmqError
from llmq.grid import Grid
from llmq.methods.base import LayerLog, Method
from llmq.methods.gptq import GPTQ, GPTQOptions, Hessian, gptq_quantize
from llmq.methods.rtn import RTN
from llmq.qtensor import QuantizedTensor

N_GRID = 20
CLIP_GRID = 20
CLIP_MIN_RATIO = 0.5
CLIP_TOKENS = 512  # tokens sampled for the clip search, as in the reference implementation
SEARCH_TOKENS = 8192  # no KL lost on llmq-ref-6m at W4/W3 against all 32768 tokens (eval/results/awq-search-tokens.md)
NO_CLIP = ("q_proj", "k_proj", "query", "key", "qkv_proj", "query_key_value", "Wqkv")

log = logging.getLogger("llmq.awq")


@dataclass(frozen=True)
class AWQOptions:
    awq_clip: bool = True  # search a per-group clipping range after scaling
    # Tokens a block's scale search runs over (0: all).  Candidates are ranked by the block's output error,
    # whose ranking settles long before all tokens are in; every token still feeds the statistics.
    search_tokens: int = SEARCH_TOKENS

    def validate(self) -> None:
        if self.search_tokens < 0:
            raise LlmqError(f"search_tokens must be 0 (all) or positive, got {self.search_tokens}")


@dataclass(frozen=True)
class AWQGPTQOptions(GPTQOptions):
    act_order: bool = False
    awq_clip: bool = False  # AWQ's clipping is tuned for RTN and hurt GPTQ in every measurement (eval/)
    search_tokens: int = SEARCH_TOKENS

    def validate(self) -> None:
        super().validate()
        AWQOptions.validate(self)  # type: ignore[arg-type]
        if self.fp_targets:  # (its GPTQ stage is made afresh per layer: nothing carries the activations along)
            raise LlmqError("awq+gptq does not take fp_targets yet; use gptq with fp_targets")


def fake_quantize(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round-to-nearest on the grid, returned in w's dtype (for searching, not storing)."""
    scale, zero, offset = grid.fit(w).per_column(w.shape[1], grid)
    return grid.value(grid.nearest(w.float(), scale, zero, offset), scale, zero, offset).to(w.dtype)


# ---- folding scales into the producing op -----------------------------------------

def _is_gemma_norm(mod: nn.Module) -> bool:
    # Gemma's RMSNorm multiplies by (1 + weight): the scale must act on (1 + weight).
    return "gemma" in type(mod).__name__.lower() and "norm" in type(mod).__name__.lower()


def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """prev's output channels / s, the linears' input columns * s: the composition is unchanged."""
    s = s.to(torch.float32)
    if isinstance(prev, nn.Linear):
        prev.weight.data = (prev.weight.data.float() / s[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
    else:  # a norm with an elementwise affine weight (and maybe a bias)
        w = prev.weight.data.float()
        prev.weight.data = ((1 + w) / s - 1 if _is_gemma_norm(prev) else w / s).to(prev.weight.dtype)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data = (bias.data.float() / s).to(bias.dtype)
    for lin in linears:
        lin.weight.data = (lin.weight.data.float() * s[None, :]).to(lin.weight.dtype)


def can_fold(layer: nn.Module, group: ScaleGroup) -> bool:
    try:
        prev = layer.get_submodule(group.prev)
    except AttributeError:  # a variant without this norm (e.g. StableLM with parallel residuals)
        return False
    width = layer.get_submodule(group.linears[0]).in_features
    if isinstance(prev, nn.Linear):
        return prev.out_features == width  # v -> o is skipped under GQA (fewer v channels than o inputs)
    return isinstance(getattr(prev, "weight", None), torch.Tensor) and prev.weight.shape == (width,)


def commutes(layer: nn.Module, group: ScaleGroup, x: torch.Tensor, kwargs: dict[str, Any], ref: torch.Tensor,
             tol: float) -> bool:
    """Whether folding a scale through ``group`` leaves the layer's function unchanged.

    Tried with a random scale on one batch of calibration samples, then undone bit for bit.  The tables
    in arch.py describe each family's usual wiring; this catches a variant they do not (say,
    one norm feeding attention and the MLP in parallel), where a fold would silently change
    the model.  The error is measured against the layer's own update (output - input), which a
    wrong fold changes by tens of percent and a right one only by rounding.
    """
    prev = layer.get_submodule(group.prev)
    linears = [layer.get_submodule(n) for n in group.linears]
    params = [p for m in (prev, *linears) for p in m.parameters(recurse=False)]
    saved = [p.data.clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    s = torch.empty(linears[0].in_features).uniform_(0.5, 2.0, generator=gen).to(x.device)
    try:
        fold_scales(prev, linears, s)
        with torch.no_grad():
            out = layer_hidden(layer(x, **kwargs))
    finally:
        for p, d in zip(params, saved):
            p.data = d
    change = (out.float() - ref.float()).norm() / (ref.float() - x.float()).norm().clamp(min=1e-12)
    return bool(change <= tol)


# ---- capture -----------------------------------------------------------------------

class _Captured:
    """Inputs of each scaling group's linears, and the extra arguments its block is called with."""

    def __init__(self):
        self.x: dict[str, list[torch.Tensor]] = {}
        self.block_kwargs: dict[str, dict[str, Any]] = {}


def _capture(layer: nn.Module, groups: list[ScaleGroup], inputs: LayerInputs) -> _Captured:
    cap = _Captured()
    handles = []
    for g in groups:
        cap.x[g.linears[0]] = []
        first = layer.get_submodule(g.linears[0])
        handles.append(first.register_forward_pre_hook(lambda _m, a, key=g.linears[0]: cap.x[key].append(a[0].detach())))
        block = layer.get_submodule(g.block)

        def keep_kwargs(module, args, kwargs, key=g.block):
            if key not in cap.block_kwargs:
                # The block's input is the group's input, replayed positionally later; keep the rest.
                rest = dict(kwargs)
                if not args:
                    rest.pop(first_param(module), None)
                cap.block_kwargs[key] = rest

        handles.append(block.register_forward_pre_hook(keep_kwargs, with_kwargs=True))
    try:
        inputs.run(layer)
    finally:
        for h in handles:
            h.remove()
    return cap


@torch.no_grad()
def sample_inputs(layer: nn.Module, names: list[str], inputs: LayerInputs, seed: int, ranks: Ranks = Ranks(),
                  tokens: int = CLIP_TOKENS) -> dict[str, torch.Tensor]:
    """A uniform sample of at most ``tokens`` rows of each named linear's input over all calibration
    batches (each row drawn a random key, the smallest keys kept: memory stays a few batches' worth).
    A MoE expert's input is the rows routed to it; an expert no row reached is left out.

    A row's key depends only on the seed, its batch's run-wide number and its module, so the ranks of a
    distributed run, each keeping its own smallest keys, together keep what one process would."""
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    gens: dict[str, torch.Generator] = {}

    def new_batch(b: int) -> None:
        for k, name in enumerate(names):
            gens[name] = torch.Generator().manual_seed((seed * 1_000_003 + b) * 65_537 + k)

    def observer(name: str):
        def see(x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1])
            keep(name, x, torch.rand(x.shape[0], generator=gens[name]).to(x.device))
        return see

    def keep(name: str, x: torch.Tensor, keys: torch.Tensor) -> None:
        if name in kept:
            x, keys = torch.cat([kept[name][0], x]), torch.cat([kept[name][1], keys])
        top = keys.argsort()[:tokens]
        kept[name] = (x[top], keys[top])

    inputs.run(layer, {layer.get_submodule(n): observer(n) for n in names}, on_batch=new_batch)
    if ranks.world > 1:
        parts = ranks.gather_objects({n: (x.cpu(), k.cpu()) for n, (x, k) in kept.items()})
        device = next(layer.parameters()).device
        kept.clear()
        for part in parts:
            for name in names:
                if name in part:
                    keep(name, part[name][0].to(device), part[name][1].to(device))
    return {n: kept[n][0] for n in names if n in kept}


def _block_out(block: nn.Module, xs: list[torch.Tensor], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The block over every captured batch (batches as LayerInputs formed them)."""
    outs = []
    for x in xs:
        y = block(x, **kwargs)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def _squared_errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    """Per batch, the summed squared difference."""
    return [float((x.float() - y.float()).pow(2).sum()) for x, y in zip(a, b)]


# ---- searches ----------------------------------------------------------------------

# How a candidate scale is judged: quantize W * s the way the final method will, divide by s.
ScaledQuantizer = Callable[[torch.Tensor, torch.Tensor, Grid], torch.Tensor]  # (w, s, grid) -> Q(w*s)/s


def rtn_judge() -> ScaledQuantizer:
    return lambda w, s, grid: fake_quantize(w.float() * s, grid) / s


def gptq_judge(xs: list[torch.Tensor], cfg: GPTQOptions, ranks: Ranks = Ranks()) -> ScaledQuantizer:
    """GPTQ on W * s against the scaled inputs' Hessian, which is H / (s s^T): computed once."""
    h = Hessian(xs[0].shape[-1])
    for x in xs:
        h.add(x)
    h.reduce(ranks, xs[0].device)

    def judge(w: torch.Tensor, s: torch.Tensor, grid: Grid) -> torch.Tensor:
        q, _ = gptq_quantize(w.float() * s, h.H / (s[:, None] * s[None, :]), grid, cfg.damp, cfg.block_size,
                             cfg.act_order, cfg.static_groups)
        return q.dequantize() / s

    return judge


@torch.no_grad()
def search_scale(layer: nn.Module, group: ScaleGroup, xs: list[torch.Tensor], kwargs: dict[str, Any],
                 grids: list[Grid], judge: ScaledQuantizer | None = None,
                 ranks: Ranks = Ranks(), max_tokens: int = 0, first_batch: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """The best scale for the group's shared input; ``grids``: the grid of each of its linears.
    ``xs``: this rank's batches, the first of them run-wide number ``first_batch``; statistics and errors are
    summed over all ranks' batches.  ``max_tokens``: a block's errors are measured on every k-th batch only,
    k the smallest that leaves at most that many tokens (0: all batches)."""
    linears = [layer.get_submodule(n) for n in group.linears]
    block = layer.get_submodule(group.block)
    n = linears[0].in_features
    device = linears[0].weight.device
    x_sum = torch.zeros(n + 1, dtype=torch.float64, device=device)  # sum |x| per channel, then the count
    for x in xs:
        x2 = x.reshape(-1, n)
        x_sum[:n] += x2.abs().double().sum(0)
        x_sum[n] += x2.shape[0]
    x_sum = ranks.sum(x_sum)
    x_mean = (x_sum[:n] / x_sum[n]).float()
    # mean over output rows of |w| normalised by its group's max |w|
    normalised = []
    for l, grid in zip(linears, grids):
        gs, groups = grid.effective_group_size(n), grid.groups(n)
        Wg = F.pad(l.weight.data.float().abs(), (0, groups * gs - n)).reshape(-1, groups, gs)
        normalised.append((Wg / Wg.amax(dim=2, keepdim=True).clamp(min=1e-12)).reshape(Wg.shape[0], -1)[:, :n])
    w_mean = torch.cat(normalised).mean(0)

    judge = judge or rtn_judge()
    candidates: list[tuple[float | None, torch.Tensor]] = [(None, torch.ones(n, device=device))]
    for i in range(N_GRID):
        alpha = i / N_GRID
        s = (x_mean.pow(alpha) / w_mean.clamp(min=1e-4).pow(1 - alpha)).clamp(min=1e-4)
        candidates.append((alpha, s / (s.max() * s.min()).sqrt()))  # centred around 1
    # s = 1 (leave the group unscaled) competes too (first): a group may gain nothing from scaling.
    tokens = int(x_sum[n])
    if block is linears[0] and len(linears) == 1 and tokens > n:
        mse = _linear_errors(linears[0], xs, candidates, grids[0], judge, ranks)
    else:
        stride = max(1, -(-tokens // max_tokens)) if max_tokens else 1
        searched = [x for i, x in enumerate(xs) if (first_batch + i) % stride == 0]  # (numbered run-wide: rank-proof)
        mse = _block_errors(linears, block, searched, kwargs, candidates, grids, judge, ranks)
    best = min(range(len(candidates)), key=lambda c: (mse[c], c))
    return candidates[best][1], {"alpha": candidates[best][0], "mse_unscaled": mse[0], "mse_best": mse[best]}


def _block_errors(linears: list[nn.Linear], block: nn.Module, xs: list[torch.Tensor], kwargs: dict[str, Any],
                  candidates: list[tuple[float | None, torch.Tensor]], grids: list[Grid], judge: ScaledQuantizer,
                  ranks: Ranks) -> list[float]:
    """Per candidate scale, the mean squared error of the block's output over every batch (every rank's)."""
    reference = _block_out(block, xs, kwargs)
    originals = [l.weight.data.clone() for l in linears]
    errors = []  # per candidate, this rank's per-batch squared errors
    for _, s in candidates:
        for l, w0, grid in zip(linears, originals, grids):
            l.weight.data = judge(w0, s, grid).to(w0.dtype)
        errors.append(_squared_errors(_block_out(block, xs, kwargs), reference))
    for l, w0 in zip(linears, originals):
        l.weight.data = w0
    # Every rank's batches in run order, added one by one: the same sums as in one process.
    parts = ranks.gather_objects((errors, sum(x.numel() for x in reference)))
    numel = sum(p[1] for p in parts)
    return [sum(e for p in parts for e in p[0][c]) / numel for c in range(len(candidates))]


def _linear_errors(linear: nn.Linear, xs: list[torch.Tensor], candidates: list[tuple[float | None, torch.Tensor]],
                   grid: Grid, judge: ScaledQuantizer, ranks: Ranks) -> list[float]:
    """The same for a block that is one linear, from its inputs' Gram matrix: Σ|ΔW x|² = Σ_rows ΔW (Σ x xᵀ) ΔWᵀ,
    an out x n x n product per candidate instead of out x n x tokens (cheaper whenever tokens > n)."""
    h = Hessian(linear.in_features)
    for x in xs:
        h.add(x)
    h.reduce(ranks, linear.weight.device)
    gram = h.sum.float()
    w0 = linear.weight.data
    numel = h.count * linear.out_features
    errors = []
    for _, s in candidates:
        d = judge(w0, s, grid).to(w0.dtype).float() - w0.float()
        errors.append(float(((d @ gram) * d).double().sum()) / numel)
    return errors


@torch.no_grad()
def search_clip(w: torch.Tensor, xs: list[torch.Tensor], grid: Grid, generator: torch.Generator,
                out_chunk: int = 256) -> torch.Tensor:
    """Per (output channel, group) max |w| after the best shrink, minimising the group's output error."""
    out, n = w.shape
    gs, groups = grid.effective_group_size(n), grid.groups(n)
    x = torch.cat([t.reshape(-1, n) for t in xs]).float()
    x = x[torch.randperm(x.shape[0], generator=generator)[:CLIP_TOKENS]]
    pad = groups * gs - n
    xg = F.pad(x, (0, pad)).reshape(-1, groups, gs)  # tokens x groups x gs
    group_grid = grid if grid.group_size == gs else dataclasses.replace(grid, group_size=gs)  # (per-channel grids)
    best_max = []
    # Output channels in chunks: the (out x tokens x groups) products would not fit for large layers.
    for wc in F.pad(w.float(), (0, pad)).split(out_chunk):
        wg = wc.reshape(-1, groups, gs)
        ref = torch.einsum("ogk,tgk->otg", wg, xg)
        max0 = wg.abs().amax(dim=2)  # chunk x groups
        best_err = torch.full_like(max0, float("inf"))
        best = max0.clone()
        for i in range(int(CLIP_GRID * (1 - CLIP_MIN_RATIO))):
            mx = max0 * (1 - i / CLIP_GRID)
            clipped = torch.maximum(torch.minimum(wg, mx[..., None]), -mx[..., None])
            q = fake_quantize(clipped.reshape(wg.shape[0], -1), group_grid).reshape(wg.shape)
            err = (torch.einsum("ogk,tgk->otg", q, xg) - ref).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, mx, best)
        best_max.append(best)
    return torch.cat(best_max)


def _group_absmax(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    out, n = w.shape
    gs, groups = grid.effective_group_size(n), grid.groups(n)
    return F.pad(w.float().abs(), (0, groups * gs - n)).reshape(out, groups, gs).amax(dim=2)


def apply_clip(lin: nn.Linear, max_val: torch.Tensor, grid: Grid) -> None:
    out, n = lin.weight.shape
    gs, groups = grid.effective_group_size(n), grid.groups(n)
    w = F.pad(lin.weight.data.float(), (0, groups * gs - n)).reshape(out, groups, gs)
    w = torch.maximum(torch.minimum(w, max_val[..., None]), -max_val[..., None])
    lin.weight.data = w.reshape(out, -1)[:, :n].to(lin.weight.dtype)


# ---- the method ----------------------------------------------------------------------

class AWQ(Method):
    name = "awq"
    Options = AWQOptions
    needs_calibration = True
    default_dataset = "pile-val"  # as the AWQ reference implementation: 128 x 512 tokens of pile-val
    default_seqlen = 512
    grid_search = False  # its clipping search already picks each group's range (a second search raised KL)
    final = RTN

    def __init__(self, options=None, seed: int = 0, ranks: Ranks = Ranks()):
        super().__init__(options, seed, ranks)
        # Whether folding through each scaling group keeps the layer's function: the layers of a model
        # share their wiring, so the first layer's answer holds for all (and a refusal is said once).
        self._commutes: dict[ScaleGroup, bool] = {}
        self._said_nothing_to_fold = False

    def _foldable(self, layer: nn.Module, groups: list[ScaleGroup], inputs: LayerInputs) -> list[ScaleGroup]:
        unchecked = [g for g in groups if g not in self._commutes]
        if unchecked:
            x, kwargs = inputs.first_batch(), inputs.kwargs
            with torch.no_grad():
                ref = layer_hidden(layer(x, **kwargs))
            tol = 1e-3 if x.dtype == torch.float32 else 3e-2
            seen = {g: commutes(layer, g, x, kwargs, ref, tol) for g in unchecked}
            self._commutes.update(self.ranks.gather_objects(seen)[0])  # (the first rank's batch decides for all)
            for g in unchecked:
                if not self._commutes[g]:
                    log.warning("AWQ: a scale cannot pass from %s to %s in this model (the layer's output changes); "
                                "that group is left unscaled", g.prev, ", ".join(g.linears))
        groups = [g for g in groups if self._commutes[g]]
        if not groups and not self._said_nothing_to_fold:
            self._said_nothing_to_fold = True
            log.warning("AWQ: no linear of this layer can take a scale (no foldable group in the architecture "
                        "table); they are rounded without AWQ's search")
        return groups

    def judge(self, xs: list[torch.Tensor]) -> ScaledQuantizer:
        return rtn_judge()

    def quantize_layer(self, layer: nn.Module, arch: Arch, targets: dict[str, Grid], inputs: LayerInputs | None,
                       log: LayerLog) -> dict:
        assert inputs is not None
        t0 = time.perf_counter()
        notes = self.scale_and_clip(layer, arch, targets, inputs)
        search_seconds = round(time.perf_counter() - t0, 3)
        # Final rounding by the wrapped method, whose per-module records get AWQ's choices added.
        inner = LayerLog(layer=log.layer)
        result = self.final(self.options, self.seed, self.ranks).quantize_layer(layer, arch, targets, inputs, inner)
        for rec in inner.records:
            module = rec.pop("module")
            rec.pop("layer", None)
            log.add(module, **rec, **notes.get(module, {}), awq_search_seconds=search_seconds)
        return result

    def scale_and_clip(self, layer: nn.Module, arch: Arch, targets: dict[str, Grid], inputs: LayerInputs) -> dict[str, dict]:
        """Search and fold the scales of every foldable group, then clip. Returns per-module notes."""
        wanted = set(targets)
        groups = self._foldable(layer, [g for g in arch.scaling if all(n in wanted for n in g.linears) and can_fold(layer, g)],
                                inputs)
        cap = _capture(layer, groups, inputs)
        notes: dict[str, dict[str, Any]] = {}
        for g in groups:
            xs = cap.x.pop(g.linears[0])  # (let go once searched: the groups' captured inputs are AWQ's largest memory)
            s, info = search_scale(layer, g, xs, cap.block_kwargs.get(g.block, {}), [targets[n] for n in g.linears],
                                   self.judge(xs), self.ranks, self.options.search_tokens,
                                   inputs.offset // inputs.batch_size)
            fold_scales(layer.get_submodule(g.prev), [layer.get_submodule(n) for n in g.linears], s)
            del xs
            for name in g.linears:
                # alpha None: leaving the group unscaled won; mse_* are the block's output errors
                notes[name] = {"alpha": info["alpha"], "awq_mse_unscaled": info["mse_unscaled"], "awq_mse_best": info["mse_best"]}
        if self.options.awq_clip:
            # Every linear is clipped on its own input (after the scales above), not only the scaled
            # groups' members: o_proj under GQA, untabled wirings and MoE experts (their routed rows) too.
            # q/k errors are amplified by the softmax: the reference leaves them unclipped.
            gen = torch.Generator().manual_seed(self.seed)
            names = [n for n in targets if n.rsplit(".", 1)[-1] not in NO_CLIP]
            xs = sample_inputs(layer, names, inputs, self.seed, self.ranks)
            for name in names:
                if name not in xs:
                    continue
                lin = layer.get_submodule(name)
                grid = targets[name]
                max_val = search_clip(lin.weight.data, [xs[name]], grid, gen)
                ratio = max_val / _group_absmax(lin.weight.data, grid).clamp(min=1e-12)
                apply_clip(lin, max_val, grid)
                notes.setdefault(name, {})["clip_ratio_mean"] = float(ratio.mean())
        return notes


class AWQGPTQ(AWQ):
    """AWQ scales chosen for what GPTQ will make of them, then GPTQ.

    Scales are judged by GPTQ-quantizing the scaled weights (not by RTN, whose best scales
    measurably fight GPTQ's error feedback), and the RTN-tuned clipping search is off unless
    asked for (awq_clip)."""

    name = "awq+gptq"
    Options = AWQGPTQOptions
    final = GPTQ

    def judge(self, xs: list[torch.Tensor]) -> ScaledQuantizer:
        return gptq_judge(xs, self.options, self.ranks)

    def quantize_alone(self, W: torch.Tensor, H: torch.Tensor, grid: Grid) -> QuantizedTensor:
        return GPTQ.quantize_alone(self, W, H, grid)  # (probes leave the scales out: they move all candidates alike)
