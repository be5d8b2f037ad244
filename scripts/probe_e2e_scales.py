"""Probe: how much end-to-end tuning of a quantized checkpoint's group scales lowers its KL.

EfficientQAT's second stage (E2E-QP, Chen et al. 2024): the integer codes stay as written, and only the
per-group scales are trained, through the whole model, here on the KL divergence from the unquantized
model's next-token distribution over the calibration windows.  The tuned scales are rounded to fp16 (what a
GPTQ file stores) before the evaluation, so the numbers are those of a file one could write.

A measurement for deciding whether to build this into llmq, not a method: it loads the whole model, so it
does not stream layers.  Symmetric and asymmetric integer grids (GPTQ / AWQ / compressed-tensors files).

    python scripts/probe_e2e_scales.py --model ../shared/assets/models/llmq-ref-6m \\
        --quantized q-w3 q-w2 --calib-dataset c4.jsonl --eval-dataset wikitext2.parquet --seqlen 256
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from llmq.checkpoint import iter_quantized, load_model, open_quantized
from llmq.data import calibration_tokens, eval_tokens
from llmq.eval.perplexity import evaluate
from llmq.grid import dequantize


class TunedScales(nn.Module):
    """A packed linear as fixed codes times trainable group scales: w = s0·exp(t)·(q − z) (llmq.grid.dequantize),
    t = 0 at the start (a log-scale step, so one learning rate suits every layer's scale magnitude)."""

    def __init__(self, qt, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("q", qt.codes.float())
        self.register_buffer("z", qt.zeros.float())
        self.register_buffer("s0", qt.scales.float())
        self.register_buffer("g", qt.g_idx.long())
        self.t = nn.Parameter(torch.zeros_like(self.s0))
        self.bias = bias

    def scales(self) -> torch.Tensor:
        return self.s0 * self.t.exp()

    def round_to_fp16(self) -> None:
        with torch.no_grad():
            self.t.copy_((self.scales().half().float() / self.s0).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.q, self.scales()[:, self.g], self.z[:, self.g]), self.bias)


def student(path: str) -> tuple[nn.Module, list[nn.Parameter]]:
    model, _ = load_model(path)
    source, qcfg = open_quantized(path)
    params = []
    for name, qt in iter_quantized(source.skeleton(torch.float32), source, qcfg):
        if qt.offsets is not None:
            raise SystemExit(f"{name}: offset grids are not probed here")
        parent, _, child = name.rpartition(".")
        tuned = TunedScales(qt, model.get_submodule(name).bias)
        setattr(model.get_submodule(parent), child, tuned)
        params.append(tuned.t)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return model, params


def tune(model: nn.Module, params: list[nn.Parameter], teacher: nn.Module, ids: torch.Tensor, steps: int,
         lr: float, batch: int) -> float:
    opt = torch.optim.Adam(params, lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    gen = torch.Generator().manual_seed(0)
    t0, step = time.perf_counter(), 0
    while step < steps:
        for b in torch.randperm(len(ids), generator=gen).split(batch):
            with torch.no_grad():
                ref = F.log_softmax(teacher(input_ids=ids[b]).logits.float(), -1)
            logp = F.log_softmax(model(input_ids=ids[b]).logits.float(), -1)
            loss = (ref.exp() * (ref - logp)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
            step += 1
            if step >= steps:
                break
    for m in model.modules():
        if isinstance(m, TunedScales):
            m.round_to_fp16()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the unquantized model")
    ap.add_argument("--quantized", nargs="+", required=True, help="quantized checkpoints of it (GPTQ/AWQ/compressed-tensors)")
    ap.add_argument("--calib-dataset", required=True)
    ap.add_argument("--eval-dataset", required=True)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=100)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher, source = load_model(args.model)
    tok = source.tokenizer()
    ids = calibration_tokens(tok, args.calib_dataset, args.nsamples, args.seqlen, seed=0)
    text = eval_tokens(tok, args.eval_dataset)[: args.max_windows * args.seqlen]
    print("| checkpoint | mean KL before | after | ratio | top-1 before | after | perplexity before | after | tuning s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.quantized:
        model, params = student(path)
        before = evaluate(model, text, args.seqlen, reference=teacher, progress=False, batch_size=8)
        seconds = tune(model, params, teacher, ids, args.steps, args.lr, args.batch)
        after = evaluate(model, text, args.seqlen, reference=teacher, progress=False, batch_size=8)
        print(f"| {path} | {before.kld:.5f} | {after.kld:.5f} | {after.kld / before.kld:.2f}× | {100 * before.top1:.2f}% | "
              f"{100 * after.top1:.2f}% | {before.ppl:.2f} | {after.ppl:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
