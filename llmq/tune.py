"""End-to-end tuning of a quantized checkpoint's scales and codes (EfficientQAT's E2E-QP, Chen et al., 2024,
with AutoRound's learned rounding carried to the whole model).

The layer-wise methods fit each linear (GPTQ) or decoder layer (signround) to its own outputs; how
their errors add up through the model is seen by none of them.  Here the per-group scales, the norms'
weights and (optionally) each integer code are trained through the whole model, on the KL divergence from
the unquantized model's next-token distribution over calibration windows:

    w = s0 * exp(t) * (q + round(v) - z),   t = 0 and v = 0 at the start,

Adam on the log-scale step t (one learning rate suits every layer's scale magnitude), its rate
decaying linearly to zero.  The output head, where it stays in float, is trained too, at a quarter of
that rate: it can absorb part of the error the quantized layers leave in the last hidden state, and the
file stores it in float either way (eval/results/tune.md).  With ``codes``, each weight's offset v is
trained by signed gradient descent (rounding passed straight through, as AutoRound does per layer) within
[-1, 1]: a code moves by at most one step from where the layer-wise method put it, and only where the
signs of many batches' gradients agree; the moves are undone where windows held out of the tuning say they
hurt (CodeCheck).  With ``sampled``, windows the unquantized model writes itself join the calibration
windows (llmq.sampled): where the calibration text is far from the model's own, the fit then carries to
the model's text (eval/results/sampled.md).  The tuned scales are rounded to what the format stores before
the file is written, so the file computes what was evaluated.

Unlike quantize this does not stream layers: it holds both models and one pass's activations with their
gradients.  Per packed weight: the student's code (1 byte) and, learning codes, its offset (4; SignedSteps),
never the weight itself (_CodesLinear); the teacher's weight in float32, or bf16 where the products are
bf16 (weights_in_bf16; its untied head too): 7 bytes a weight in all where the products are bf16 (a GPU, a
CPU with bf16 units).  With ``recompute``, one layer's activations instead of every layer's.
The rest in float32: the embeddings, norms and a float head (training the head: its gradient and Adam's two
moments, three more copies of it).  A batch goes through in parts where its logits would be large
(PASS_LOGITS_BYTES).  Sampled windows are drawn before the tuning starts, their KV cache within
llmq.sampled.cache_budget.
Integer-grid checkpoints only (GPTQ, AWQ, compressed-tensors): a GGUF K-quant's or bitsandbytes' scales are
themselves quantized.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from llmq.arch import arch_for, get_module
from llmq.checkpoint import iter_quantized, load_model, open_quantized, packed_linears
from llmq.config import CalibConfig, QuantizeConfig
from llmq.distributed import Ranks
from llmq.data import calibration_tokens
from llmq.dtypes import autocast_bf16
from llmq.errors import LlmqError, out_of_memory
from llmq.export import previous_provenance, write_checkpoint
from llmq.formats import format_for_config
from llmq.grid import IntGrid
from llmq.heap import step_buffers_from_heap
from llmq.output import Output
from llmq.pipeline import RunStats, calibration_ids, quantize_model
from llmq.plan import resolve, resolve_calibration
from llmq.qtensor import QuantizedTensor, group_scale, group_sum
from llmq.recipe import check_calibration
from llmq.sampled import sampled_windows
from llmq.source import ModelSource


@dataclass(frozen=True)
class TuneOptions:
    steps: int = 160  # Adam steps of ``batch`` windows (eval/results/tune.md: 80 gained about half of what 160 did)
    # (lr, batch, head, codes: the recipe keys' defaults, tune_lr, ...: both ways of tuning agree)
    lr: float = QuantizeConfig.tune_lr  # on the log-scales and the norms' weights, decaying linearly to 0
    batch: int = QuantizeConfig.tune_batch  # calibration windows per step
    norms: bool = True  # tune the norms' weights too (a few parameters per layer; lowered KL where measured)
    head: bool = QuantizeConfig.tune_head  # the output head's weights too, where stored in float (HEAD_LR_FACTOR)
    codes: bool = QuantizeConfig.tune_codes  # each code too, by at most one step (CODE_SPREAD)
    recompute: bool = QuantizeConfig.tune_recompute  # each decoder layer's activations formed again in the backward
    check_codes: bool = True  # with codes: their moves checked on held-out windows, undone where they hurt (CodeCheck)
    sampled: int = QuantizeConfig.tune_sampled  # windows the unquantized model writes, added to the calibration's
    seed: int = 0  # order of the windows
    # Products in bf16 (autocast; fp32 parameters, Adam and loss).  auto: where they run on bf16 units (a GPU,
    # a CPU with AMX/AVX512-BF16): 1.5x faster here at the same KL (eval/results/tune.md); else float32.
    compute_dtype: str = "auto"

    def validate(self) -> None:
        if self.compute_dtype not in ("auto", "bfloat16", "float32"):
            raise LlmqError(f"compute dtype must be auto, bfloat16 or float32, got {self.compute_dtype!r}")
        if self.steps <= 0:
            raise LlmqError(f"steps must be positive, got {self.steps}")
        if not self.lr > 0:
            raise LlmqError(f"lr must be positive, got {self.lr}")
        if self.batch <= 0:
            raise LlmqError(f"batch must be positive, got {self.batch}")
        if self.sampled < 0:
            raise LlmqError(f"sampled windows must be 0 or more, got {self.sampled}")


class ScaledCodes(nn.Module):
    """A packed linear as codes times trainable group scales: w = s0·exp(t)·(q + round(v) − z), where the
    code offsets v (with ``codes``; else the codes are fixed) move a code by at most one step.  It keeps the
    codes (1 byte a weight) and, with ``codes``, the offsets (4), never w: each forward and backward forms it
    again (_CodesLinear)."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, codes: bool = False):
        super().__init__()
        if not isinstance(qt.grid, IntGrid) or qt.offsets is not None:
            raise LlmqError(f"scale tuning needs integer grids; this checkpoint has {qt.grid.name}")
        self.qt = qt  # (codes, zeros, grid: what the file keeps)
        self.register_buffer("q", qt.codes.to(torch.uint8))  # (qt's own codes, not a copy, where they are uint8)
        self.register_buffer("z", qt.zeros.float())
        self.register_buffer("s0", qt.scales.float())
        self.register_buffer("g", qt.g_idx.long())
        # Groups of consecutive columns (no act-order permutation): scales broadcast over each group instead
        # of being gathered per column, whose backward is a slower scatter.
        self.group = qt.group_width
        self.t = nn.Parameter(torch.zeros_like(self.s0))
        self.bias = bias
        self.v: nn.Parameter | None = nn.Parameter(torch.zeros(self.q.shape)) if codes else None

    def scales(self) -> torch.Tensor:
        return self.s0 * self.t.exp()

    def stored_scales(self) -> torch.Tensor:
        """The scales as the format stores them (the grid's scale dtype), kept finite and positive."""
        return self.qt.grid.stored(self.scales().detach())

    def round_to_stored(self) -> None:
        with torch.no_grad():
            self.t.copy_((self.stored_scales() / self.s0).log())

    def code_shift(self, v: torch.Tensor | None = None) -> torch.Tensor:
        """How far each code has moved at offsets ``v`` (default: the current ones): round(v), kept on the grid."""
        v = self.v.detach() if v is None else v
        return (self.q + v.round()).clamp(0, self.qt.grid.maxq) - self.q

    def centred(self, shift: torch.Tensor | None) -> torch.Tensor:
        """q + shift − z per weight, in float32 (integers: exact)."""
        c = self.q.float() if shift is None else self.q + shift
        if self.group:
            return c.view(c.shape[0], -1, self.group).sub_(self.z.unsqueeze(-1)).view(c.shape)
        return c.sub_(self.z[:, self.g])

    def by_column(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x (out, in) times each column's group scale from s (out, groups)."""
        return group_scale(x, s, self.group, self.g)

    def weight(self, v: torch.Tensor | None, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(w, c, shift) at offsets ``v`` (None: the codes as stored) and scales ``s``: shift = round(v) kept on
        the grid, c = q + shift − z, and w = c times each column's scale, in float32."""
        shift = None if v is None else self.code_shift(v)
        c = self.centred(shift)
        return self.by_column(c, s), c, shift

    def codes(self) -> torch.Tensor:
        if self.v is None:
            return self.qt.codes
        return (self.q + self.code_shift()).to(self.qt.codes.dtype).cpu()

    def quantized(self) -> QuantizedTensor:
        qt = self.qt
        return QuantizedTensor(self.codes(), self.stored_scales().cpu(), qt.zeros, qt.g_idx, qt.grid, None, qt.stored)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CodesLinear.apply(x, self.v, self.scales(), self)


class _CodesLinear(torch.autograd.Function):
    """F.linear(x, w) for ScaledCodes' w = s·(q + shift − z), in the products' dtype (autocast's where it is
    on), with the rounding in shift = round(v) passed straight through: d w / d v is the column's scale where
    the code stays inside the grid, 0 where clamped.  Autograd would keep each linear's w from the forward to
    the backward (2 bytes a weight in bf16, every linear of the model at once) and two float32 tensors of its
    shape for d w / d v; this keeps x, v and s, and forms w again in the backward: the same arithmetic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor | None, s: torch.Tensor, m: ScaledCodes) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xc = x.to(dtype)
        ctx.m, ctx.x_dtype = m, x.dtype
        ctx.save_for_backward(xc, v, s)
        w = m.weight(v, s)[0].to(dtype)
        return F.linear(xc, w, None if m.bias is None else m.bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xc, v, s = ctx.saved_tensors
        m = ctx.m
        w, c, shift = m.weight(v, s)  # (the saved v: the offsets of this forward)
        w = w.to(grad.dtype)
        g2, x2 = grad.reshape(-1, grad.shape[-1]), xc.reshape(-1, xc.shape[-1])
        grad_x = g2.mm(w).view(xc.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = g2.t().mm(x2).float()  # (contiguous, as autograd's own: the same bits)
        grad_v = None if v is None else m.by_column(grad_w, s).mul_(shift == v.round())  # (0 where clamped)
        grad_s = group_sum(grad_w.mul_(c), m.group, m.g, s.shape[1])
        return grad_x, grad_v, grad_s, None


@dataclass
class Student:
    """The quantized model with its packed linears as ScaledCodes, and what training moves."""

    model: nn.Module
    linears: dict[str, ScaledCodes]
    norms: dict[str, nn.Parameter]  # parameter name -> a norm's weight
    head: dict[str, nn.Parameter]  # the output head's weight under its stored name (a tied one: the embedding's), or {}

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups(1.0) for p in group["params"]] + self.code_offsets()

    def code_offsets(self) -> list[nn.Parameter]:
        """Each packed linear's v, where codes are learned (SignedSteps moves them, not Adam)."""
        return [m.v for m in self.linears.values() if m.v is not None]

    def param_groups(self, lr: float) -> list[dict]:
        """Adam's groups: the scales and norms at ``lr``, the head at HEAD_LR_FACTOR of it."""
        groups = [{"params": [m.t for m in self.linears.values()] + list(self.norms.values()), "lr": lr}]
        if self.head:
            groups.append({"params": list(self.head.values()), "lr": lr * HEAD_LR_FACTOR})
        return groups

    def floats(self) -> dict[str, torch.Tensor]:
        """The trained float tensors, by the names the checkpoint stores them under."""
        return {name: w.detach().cpu() for name, w in {**self.norms, **self.head}.items()}


# The head's learning rate relative to the scales': 0.1, 0.25 and 0.5 gave the same KL within 1% (llmq-ref-6m W3),
# as 0.75 did on stories260K W3.  An untied input embedding trained at 0.25 overfit the calibration text
# (eval/results/tune.md), so only the head is trained.
HEAD_LR_FACTOR = 0.25

# The spread of a code offset whose gradient's signs are coin flips, at the end of the tuning: the signed steps
# start at CODE_SPREAD·√(3 / steps) and decay linearly to 0, so that such an offset ends past ±½, moving its
# code, with probability 2Φ(−½ / CODE_SPREAD) ≈ 0.06% whatever the number of steps, while an offset whose
# signs mostly agree travels up to CODE_SPREAD·√(3·steps) / 2 (1.6 at 160 steps).  0.146 (0.02 a step at 160
# steps) lowered KL by 3-21% on llmq-ref-6m and stories260K at W4-W2; twice it (a 9% chance of moving on noise
# alone) made llmq-ref-6m's W3 worse than keeping every code (eval/results/tune.md).
CODE_SPREAD = 0.146


class SignedSteps(torch.optim.Optimizer):
    """Signed gradient descent (AutoRound's) on code offsets, each kept within [-1, 1].  Each offset steps as
    soon as its gradient is complete, during the backward, and drops it: one linear's gradient lives at a
    time, not every linear's until the step (4 bytes a weight, the size of the offsets themselves).
    While ``hold`` is set, backwards only add to the gradients (a batch in parts, whose every offset's gradient
    then lives until the last part): the first backward after it is cleared steps on the sum."""

    def __init__(self, params: list[nn.Parameter], lr: float):
        super().__init__(params, {"lr": lr})
        self.hold = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._step_one)

    @torch.no_grad()
    def _step_one(self, p: nn.Parameter) -> None:
        if self.hold:
            return
        p.sub_(p.grad.sign(), alpha=self.param_groups[0]["lr"]).clamp_(-1, 1)
        p.grad = None

    def step(self, closure=None) -> None:
        """Steps what the backward left (gradients set by hand)."""
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                self._step_one(p)


def student(source: ModelSource, qcfg: dict, norms: bool, head: bool = False, codes: bool = False) -> Student:
    """The quantized checkpoint as a float32 model whose packed linears are ScaledCodes (everything else as
    stored), every parameter frozen but the log-scales and, with ``norms``, the norms' weights, with
    ``head``, the output head's if it is not packed, and with ``codes``, the code offsets."""
    model = source.skeleton(torch.float32)
    packed = dict(iter_quantized(model, source, qcfg))
    if not packed:
        raise LlmqError(f"{source.name!r} has no packed linears to tune")
    for name, qt in packed.items():  # (a placeholder without memory, so that materializing reads only the rest)
        model.get_submodule(name).weight = nn.Parameter(torch.zeros(()).expand(qt.shape), requires_grad=False)
    source.materialize(model, "", torch.float32)
    linears = {}
    for name, qt in packed.items():
        parent, _, child = name.rpartition(".")
        linears[name] = ScaledCodes(qt, model.get_submodule(name).bias, codes)
        setattr(model.get_submodule(parent), child, linears[name])
    if getattr(source.config, "tie_word_embeddings", False):
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    tuned = {f"{n}.weight": m.weight for n, m in model.named_modules()
             if norms and "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)}
    s = Student(model.eval(), linears, tuned, _float_head(model) if head else {})
    if s.head:
        _head_role_alone(model)
    for p in s.parameters():
        p.requires_grad_(True)
    return s


def _float_head(model: nn.Module) -> dict[str, nn.Parameter]:
    """The output head's weight by its stored name, if it stays in float (a packed head's scales are tuned as
    any linear's).  A tied head is the input embedding: the model's first name for it is what is stored."""
    out = model.get_output_embeddings()
    if out is None or isinstance(out, ScaledCodes) or not isinstance(getattr(out, "weight", None), nn.Parameter):
        return {}
    return {next(n for n, p in model.named_parameters() if p is out.weight): out.weight}


def _head_role_alone(model: nn.Module) -> None:
    """A head tied to the input embedding learns from its head role alone: the lookup passes no gradient.
    A row then learns only from the softmax, which every row takes part in at every token, not from the few
    tokens that look it up.  Trained as an input embedding too, llmq-ref-6m's (untied) overfit the calibration
    text, and a large vocabulary sees most rows rarely (eval/results/tune.md).  The forward still uses the
    moved rows, so the loss sees their effect."""
    embedding = model.get_input_embeddings()
    if embedding is not None and getattr(embedding, "weight", None) is model.get_output_embeddings().weight:
        embedding.register_forward_hook(lambda module, args, output: output.detach())


@dataclass
class TuneResult:
    first_loss: float  # KL of the first step's batch, before any update
    last_loss: float  # mean KL of the last tenth of the steps' batches
    seconds: float
    codes_moved: int = 0  # codes one step away from where the checkpoint had them
    codes_undone: dict | None = None  # where CodeCheck undid the code moves: its step and both held-out KLs


# Learning codes, one calibration window in HELD_OUT is held out of the tuning where that makes at least
# MIN_HELD_OUT windows (fewer judge too noisily, and cost the tuning too large a share), and the code moves are
# checked on them at every CODE_CHECKS-th of the steps from half of them on (CodeCheck).
HELD_OUT = 8
MIN_HELD_OUT = 8
CODE_CHECKS = 4


@dataclass
class CodeCheck:
    """The code moves, checked on windows the tuning does not see: the held-out KL with every code where the
    moves put it, and with every move undone (the scales, norms and head as they are).  Where undoing clearly
    gives the lower KL (window by window, _clearly_lower), the moves are undone and the codes learn no more; the
    scales go on tuning to the kept codes.  Checks start at half the steps: the first moves jolt the KL before
    the scales take them in.

    A move is a whole grid step, judged by a straight-through gradient: where the layer-wise method's codes
    are already near their optimum, moves can cost more than their gradient promised.  On stories260K with its
    attention alone quantized (after signround), the first few hundred moves raised the calibration windows'
    KL by a third, training and held-out windows alike, and the end of the tuning did not win it back; on
    llmq-ref-6m's whole model every check kept them (eval/results/tune.md).  Two passes over the held-out
    windows a check, against the tuning's three over each step's."""

    ids: torch.Tensor
    targets: torch.Tensor | None  # the teacher's logits of ``ids``, where they are cached
    every: int  # steps between checks
    first: int  # the first step checked
    per_pass: int
    bf16: bool

    @torch.no_grad()
    def kl(self, s: Student, teacher: nn.Module) -> torch.Tensor:
        """Each held-out window's mean KL."""
        parts = torch.arange(len(self.ids)).split(self.per_pass)
        return torch.cat([_part_kl(s, teacher, self.ids, part, self.targets, self.bf16).mean(-1).cpu() for part in parts])

    def undoes(self, s: Student, teacher: nn.Module, step: int) -> dict | None:
        """At a check step where codes have moved: the check, and (undoing them) its KLs; else None."""
        if step < self.first or step % self.every:
            return None
        if not any(bool(m.code_shift().any()) for m in s.linears.values() if m.v is not None):
            return None
        moved = self.kl(s, teacher)
        offsets = {name: m.v for name, m in s.linears.items() if m.v is not None}
        for m in s.linears.values():
            m.v = None  # (the codes as the checkpoint has them)
        kept = self.kl(s, teacher)
        if _clearly_lower(kept, moved):
            return {"step": step, "held_out_kl_moved": float(moved.mean()), "held_out_kl_undone": float(kept.mean())}
        for name, v in offsets.items():
            s.linears[name].v = v
        return None


def _clearly_lower(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether per-window values ``a`` are lower than the same windows' ``b`` by more than twice the standard
    error of the mean difference (a paired comparison: a window's text makes both high or both low)."""
    d = (b - a).double()
    return len(d) > 1 and bool(d.mean() > 2 * d.std() / len(d) ** 0.5)


def code_check(s: Student, teacher: nn.Module, ids: torch.Tensor, o: TuneOptions, per_pass: int, bf16: bool,
               gen: torch.Generator) -> tuple[CodeCheck | None, torch.Tensor]:
    """The held-out windows' CodeCheck and the windows left for the tuning (all of them, with no check)."""
    held = len(ids) // HELD_OUT
    if not (s.code_offsets() and o.check_codes and held >= MIN_HELD_OUT):
        return None, ids
    order = torch.randperm(len(ids), generator=gen)
    ids_held = ids[order[:held]]
    targets = _cached_teacher(teacher, ids_held, per_pass, bf16, s.model.device)
    every = max(1, o.steps // CODE_CHECKS)
    return CodeCheck(ids_held, targets, every, o.steps // 2, per_pass, bf16), ids[order[held:]]


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each token's next-token distributions."""
    ref = F.log_softmax(teacher_logits.float(), -1)
    return (ref.exp() * (ref - F.log_softmax(student_logits.float(), -1))).sum(-1)


def teacher_logits(teacher: nn.Module, ids: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The unquantized model's logits of windows ``ids``, in the dtype of the products (bf16 or float32:
    storing them so loses nothing, and bf16 halves a cache's memory)."""
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = teacher(input_ids=ids, use_cache=False).logits
    return logits.to(torch.bfloat16 if bf16 else torch.float32)


# The teacher's logits of every window are computed once and kept when they take at most this much memory
# (ten epochs of 160 x 8 windows over 128 then cost one teacher pass, not ten); else once per step.
TEACHER_CACHE_BYTES = 2 * 2**30


def tune(s: Student, teacher: nn.Module, ids: torch.Tensor, o: TuneOptions, progress: bool = True) -> TuneResult:
    """``o.steps`` steps on batches of calibration windows (epochs of a seeded shuffle): Adam's on the scales,
    norms and head, signed ones on the code offsets; then every scale rounded to what is stored."""
    signed = SignedSteps(s.code_offsets(), CODE_SPREAD * (3 / o.steps) ** 0.5) if s.code_offsets() else None
    adam = torch.optim.Adam(s.param_groups(o.lr), fused=True)  # (one kernel per group of parameters)
    opts = [adam] + ([signed] if signed else [])
    decays = [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / o.steps) for opt in opts]
    gen = torch.Generator().manual_seed(o.seed)
    batches: list[torch.Tensor] = []
    losses = []
    t0 = time.perf_counter()
    device = s.model.device
    bf16 = autocast_bf16(o.compute_dtype, device)
    if o.recompute:  # (the teacher, a plain model of the same wiring, names the layers: the student's linears are not)
        recompute_layers(s.model, arch_for(teacher).layers)
    per_pass = windows_per_pass(teacher, ids.shape[1], o.batch)
    if o.sampled:
        ids = torch.cat([ids, sampled_windows(teacher, o.sampled, ids.shape[1], ids, o.seed, bf16, progress)])
    check, ids = code_check(s, teacher, ids, o, per_pass, bf16, gen)
    cached = _cached_teacher(teacher, ids, per_pass, bf16, device)
    undone = None
    bar = tqdm(range(1, o.steps + 1), desc="tuning scales end to end", unit="step", disable=not progress)
    for step in bar:
        if not batches:
            batches = list(torch.randperm(len(ids), generator=gen).split(o.batch))[::-1]
        for opt in opts:
            opt.zero_grad()
        losses.append(_backward(s, teacher, ids, batches.pop().split(per_pass), cached, bf16, signed))
        for opt, decay in zip(opts, decays):
            opt.step()
            decay.step()
        bar.set_postfix(kl=f"{losses[-1]:.3g}")
        if check is not None and undone is None and (undone := check.undoes(s, teacher, step)) is not None:
            opts, decays, signed = opts[:1], decays[:1], None  # (the codes learn no more)
    for m in s.linears.values():
        m.round_to_stored()
    tail = losses[-max(1, o.steps // 10):]
    moved = sum(int((m.codes() != m.qt.codes).sum()) for m in s.linears.values())
    return TuneResult(losses[0], sum(tail) / len(tail), time.perf_counter() - t0, moved, undone)


def recompute_layers(model: nn.Module, layers: str) -> None:
    """Each decoder layer keeps only its inputs for the backward and runs its forward again there
    (activation checkpointing): a pass's activations shrink from every layer's (about 250 KB a token and
    layer at hidden 4096: 16 GB for a 7B model's window of 2048) to one layer's, for one more forward of the
    student a step.  The same arithmetic: the forward is run again as it ran.  ``layers``: the path of the
    model's list of decoder layers (Arch.layers)."""
    for layer in get_module(model, layers):
        if not (isinstance(layer.forward, partial) and layer.forward.func is checkpoint):
            layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)


# A batch goes through the models in parts of at most this many bytes of float32 logits (at least a window),
# their gradients summed: the KL's softmaxes keep several logit-sized tensors for the backward, and a large
# vocabulary's batch would not fit (4 windows of 2048 tokens at Llama-3's 128k: 4 GiB a tensor).  A window of
# 2048 tokens is enough work for each product to run at full speed; llmq-ref-6m's and stories260K's batches
# go through whole.
PASS_LOGITS_BYTES = 2**28


def windows_per_pass(model: nn.Module, seqlen: int, batch: int) -> int:
    """How many of a batch's windows go through at once (PASS_LOGITS_BYTES); at least one."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, min(batch, PASS_LOGITS_BYTES // (seqlen * vocab * 4)))


def _backward(s: Student, teacher: nn.Module, ids: torch.Tensor, parts: tuple[torch.Tensor, ...],
              cached: torch.Tensor | None, bf16: bool, signed: SignedSteps | None) -> float:
    """The mean KL of a batch of windows (indices into ``ids``) that goes through in ``parts``, its gradient
    added to the parameters'; ``signed`` steps the code offsets on the whole batch's, in the last backward."""
    windows = sum(len(part) for part in parts)
    loss = 0.0
    for k, part in enumerate(parts):  # (each part weighted by its windows)
        part_loss = _part_kl(s, teacher, ids, part, cached, bf16).mean() * (len(part) / windows)
        if signed is not None:
            signed.hold = k < len(parts) - 1
        part_loss.backward()
        loss += float(part_loss.detach())
    return loss


def _part_kl(s: Student, teacher: nn.Module, ids: torch.Tensor, part: torch.Tensor, cached: torch.Tensor | None,
             bf16: bool) -> torch.Tensor:
    """Each token's KL(teacher || student) over windows ``part`` (indices into ``ids``): the teacher's logits
    from ``cached`` where kept, the student's products in bf16 where ``bf16``."""
    x = ids[part].to(s.model.device)
    target = teacher_logits(teacher, x, bf16) if cached is None else cached[part.to(cached.device)]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return token_kl(s.model(input_ids=x, use_cache=False).logits, target)


def _cached_teacher(teacher: nn.Module, ids: torch.Tensor, batch: int, bf16: bool, device: torch.device) -> torch.Tensor | None:
    """Every window's teacher_logits, if they fit TEACHER_CACHE_BYTES (else None)."""
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if ids.numel() * vocab * (2 if bf16 else 4) > TEACHER_CACHE_BYTES:
        return None
    return torch.cat([teacher_logits(teacher, chunk.to(device), bf16) for chunk in ids.split(batch)])


DEFAULT_DATASET = "c4"  # calibration text when none is named (GPTQ's, whose checkpoints this tunes most)
DEFAULT_SEQLEN = 2048  # window when none is named (capped by the model's context)


def reference_of(source: ModelSource) -> str:
    """The model a quantized checkpoint was made from, as its provenance names it."""
    prev = previous_provenance(source.dir)
    if prev is None:
        raise LlmqError(f"{source.name!r} has no llmq provenance naming its source model; give --reference")
    return prev["source"]["model"]


def tune_checkpoint(src: str, out: str | Path, *, reference: str | None = None, calib: CalibConfig = CalibConfig(),
                    ids: torch.Tensor | None = None, options: TuneOptions = TuneOptions(), overwrite: bool = False,
                    max_shard_size: str = "4GB", device: str = "cpu", progress: bool = True,
                    trust_remote_code: bool = False, src_label: str | None = None) -> tuple[Path, TuneResult]:
    """Tune ``src``'s scales against ``reference`` (the unquantized model; default: the one its provenance
    names) on ``ids`` (else windows drawn as ``calib`` says) and write the result in ``src``'s format.
    ``src_label``: what the provenance calls ``src`` (default its name)."""
    options.validate()
    source, qcfg = open_quantized(src, trust_remote_code)
    if qcfg is None:
        raise LlmqError(f"{src!r} is not a quantized checkpoint; quantize it first (llmq quantize)")
    fmt = format_for_config(qcfg)
    if not isinstance(fmt.grid_from_config(qcfg), IntGrid):
        raise LlmqError(f"{src!r} is a {fmt.name} checkpoint; scale tuning needs integer grids (gptq, awq, compressed-tensors)")
    # What the provenance records of the windows: how they were drawn, or that the caller drew them.
    drawn = asdict(calib) if ids is None else {"dataset": "the calibration ids of the run that quantized it"}
    if ids is None:  # (before the models load: a bad dataset fails fast)
        ids = _calibration_ids(source, calib)
    reference = reference or reference_of(source)
    teacher, ref_source = load_model(reference, trust_remote_code=trust_remote_code)
    if autocast_bf16(options.compute_dtype, torch.device(device)):
        weights_in_bf16(teacher, packed_linears(teacher, source, qcfg) + _untied_head(teacher))  # (before the student)
    s = student(source, qcfg, options.norms, options.head, options.codes)
    _check_same_shapes(s, teacher, reference)
    s.model.to(device)
    with step_buffers_from_heap():  # (after a streamed quantization here, each step's buffers would be fresh mmaps)
        result = tune(s, teacher.to(device), ids, options, progress)
    del teacher
    recipe = {"tune": {"from": src_label or src, "reference": reference, **asdict(options), **drawn, "nsamples": ids.shape[0],
                       "seqlen": ids.shape[1], "first_kl": result.first_loss, "last_kl": result.last_loss,
                       "codes_moved": result.codes_moved, "codes_undone": result.codes_undone,
                       "seconds": round(result.seconds, 1)}}
    path = write_checkpoint(source, qcfg, fmt, out, ((n, m.quantized()) for n, m in s.linears.items()), recipe,
                            floats=s.floats(), max_shard_size=max_shard_size, overwrite=overwrite, inputs=[ref_source.dir])
    return path, result


def weights_in_bf16(teacher: nn.Module, names: list[str]) -> None:
    """The teacher's linears ``names`` (those the student has packed) keep their weights in bf16: their
    products, in bf16 autocast, round them so anyway (the same logits, bit for bit), and the teacher then
    takes 2 bytes a weight instead of 4.  A weight tied to another module (a head tied to the embedding) is
    replaced in the linear alone, so the other keeps its float32 one."""
    for name in names:
        linear = teacher.get_submodule(name)
        linear.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)


def _untied_head(model: nn.Module) -> list[str]:
    """The output head's module name if it is a linear of its own (a tied one would need a copy: left)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, nn.Linear) or embedding is not None and head.weight is embedding.weight:
        return []
    return [next(n for n, m in model.named_modules() if m is head)]


def _calibration_ids(source: ModelSource, calib: CalibConfig) -> torch.Tensor:
    check_calibration(calib)
    c = resolve_calibration(calib, source, DEFAULT_DATASET, DEFAULT_SEQLEN)
    return calibration_tokens(source.tokenizer(), c.dataset, c.nsamples, c.seqlen, c.seed, c.split)


def _check_same_shapes(s: Student, teacher: nn.Module, reference: str) -> None:
    """The reference must be the quantized model's unquantized twin: the same parameters, of the same shapes."""
    learned = {id(p) for m in s.linears.values() for p in (m.t, m.v) if p is not None}
    theirs = {n: p.shape for n, p in teacher.named_parameters()}
    for name, p in s.model.named_parameters():
        if id(p) not in learned and theirs.get(name) != p.shape:
            raise LlmqError(f"--reference {reference!r} does not match the quantized model: {name} is "
                            f"{tuple(p.shape)} here, {tuple(theirs[name]) if name in theirs else 'missing'} there")


def quantize_then_tune(source: ModelSource, cfg: QuantizeConfig, out: str | Path, *, overwrite: bool = False,
                       device: str = "cpu", progress: bool = True, calib_ids: torch.Tensor | None = None,
                       ranks: Ranks = Ranks()) -> RunStats:
    """A recipe with ``tune_steps``: its quantization into a staging directory beside ``out`` (removed
    afterwards), then that many steps of tuning on the same calibration windows into ``out``."""
    if ranks.world > 1:
        raise LlmqError("tune_steps runs in one process; launch without torchrun (or run `llmq tune` afterwards)")
    out = Path(out)
    Output(out, overwrite=overwrite, inputs=[source.dir])  # (its checks, before the work rather than after)
    if calib_ids is None:
        calib_ids = calibration_ids(source, resolve(cfg, source, device))
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.untuned-", dir=out.parent))
    try:
        stats = quantize_model(source, cfg, stage / "quantized", device=device, progress=progress, calib_ids=calib_ids)
        options = TuneOptions(steps=cfg.tune_steps, lr=cfg.tune_lr, batch=cfg.tune_batch, head=cfg.tune_head,
                              codes=cfg.tune_codes, recompute=cfg.tune_recompute, sampled=cfg.tune_sampled)
        t0 = time.perf_counter()
        try:
            stats.output, _ = tune_checkpoint(str(stats.output), out, reference=str(source.dir), ids=calib_ids,
                                              options=options, overwrite=overwrite, max_shard_size=cfg.max_shard_size,
                                              device=device, progress=progress,
                                              src_label="the quantization recorded under quantized_with")
        except Exception as e:  # (not an interrupt: asked to stop, the run leaves nothing)
            raise _tuning_failed(e, _keep_untuned(stats.output, out), source, out, options) from None
        stats.seconds += time.perf_counter() - t0
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return stats


def _keep_untuned(quantized: Path, out: Path) -> Path | None:
    """The finished quantization of a run whose tuning failed, moved to ``out``.untuned (unless that is taken):
    hours of GPTQ are not lost to the tuning's memory."""
    kept = out.with_name(f"{out.name}.untuned")
    if kept.exists():
        return None
    quantized.rename(kept)
    return kept


def _tuning_failed(e: Exception, kept: Path | None, source: ModelSource, out: Path, o: TuneOptions) -> Exception:
    """A failed tuning as one line (a user's error, out of memory) naming what was kept; else ``e``, with a note."""
    oom = out_of_memory(e)
    reason = str(e) if isinstance(e, LlmqError) else oom
    recompute = o.recompute or oom is not None  # (out of memory: try it)
    again = (f"llmq tune --model {kept} --reference {source.name} --steps {o.steps} --lr {o.lr} --batch {o.batch}"
             f"{'' if o.head else ' --no-head'}{'' if o.codes else ' --no-codes'}{' --recompute' if recompute else ''}"
             f" --out {out}")
    where = (f"; the quantization it started from is in {kept} (`{again}`, with the run's calibration flags, tunes it "
             f"again)" if kept else f"; {out}.untuned exists, so the quantization was not kept")
    if reason is None:
        e.add_note(f"llmq: the tuning failed{where}")
        return e
    return LlmqError(f"tuning failed: {reason}{where}")
