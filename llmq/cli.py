"""Command line: ``python -m llmq {quantize,eval} ...``."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import resource
import shlex
import sys
from pathlib import Path

import transformers

import llmq
from llmq.checkpoint import load_for_eval
from llmq import distributed, interrupts
from llmq.config import CalibConfig, QuantizeConfig
from llmq.data import eval_tokens
from llmq.dtypes import COMPUTE_DTYPES, FLOAT_DTYPES, torch_dtype
from llmq.errors import LlmqError, out_of_memory
from llmq.eval import evaluate
from llmq.export import PLAIN, export_checkpoint, export_gguf
from llmq.formats import FORMATS
from llmq.gguf.check import check_gguf
from llmq.gguf.reader import is_gguf_file
from llmq.gguf.types import BLOCK_TYPES, FLOAT_TYPES, MIXES
from llmq.grid import SUPPORTED_BITS
from llmq.hub import push
from llmq.methods import METHODS
from llmq.methods.gptq import GPTQOptions
from llmq.pipeline import quantize_model
from llmq.provenance import verify
from llmq.recipe import build_config, load_recipe, save_recipe
from llmq.report import load_suite, run_report
from llmq.source import ModelSource
from llmq.tune import DEFAULT_DATASET, TuneOptions, TuneResult, quantize_then_tune, tune_checkpoint

EPILOG_QUANTIZE = """examples:
  python -m llmq quantize --model meta-llama/Llama-2-7b-hf --method gptq --bits 4 --group-size 128 --out llama2-7b-w4g128
  python -m llmq quantize --config configs/gptq-w4g128.yaml --model ./my-model --out ./my-model-gptq
  python -m llmq quantize --model ./my-model --method rtn --bits 8 --group-size -1 --out ./my-model-w8
"""


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    cfg = QuantizeConfig()
    p = sub.add_parser("quantize", help="quantize a causal LM, streaming one decoder layer at a time",
                       description="Quantize a Hugging Face causal LM layer by layer and write a checkpoint or a GGUF file.",
                       epilog=EPILOG_QUANTIZE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local directory of the fp model")
    p.add_argument("--out", required=True, help="output directory, or .gguf file with --format gguf (written atomically)")
    p.add_argument("--config", help="YAML recipe (see configs/); flags given here override it")
    _add_grid_args(p.add_argument_group("method and grid"), cfg)
    _add_method_args(p.add_argument_group("method options (GPTQ, signround, AWQ)"), GPTQOptions())
    _add_calibration_args(p.add_argument_group("calibration"), CalibConfig())
    _add_output_args(p.add_argument_group("output: format, precision rules, size"), cfg)
    _add_tuning_args(p.add_argument_group("end-to-end tuning after the quantization"), cfg)
    p.add_argument("--save-recipe", help="also write the run's recipe (with an allocation's per-module rules) to this YAML file")
    p.add_argument("--device", default="cpu", help="torch device for calibration (cpu, cuda, cuda:1)")
    p.add_argument("--revision", help="hub revision of --model")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new one is complete)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out with the same settings")
    p.add_argument("--allow-nonfinite", action="store_true", help="set NaN/Inf weights of the model to 0 (logged) instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--stats-json", help="write wall time and peak RSS of this run to this JSON file")
    p.set_defaults(func=cmd_quantize)


def _add_grid_args(a: argparse._ArgumentGroup, cfg: QuantizeConfig) -> None:
    a.add_argument("--method", choices=sorted(METHODS), help=f"quantization method (default {cfg.method})")
    a.add_argument("--bits", type=int, help=f"code width: {', '.join(map(str, SUPPORTED_BITS))} (default {cfg.bits})")
    a.add_argument("--group-size", type=int, help=f"columns per scale; -1 = one per output channel (default {cfg.group_size})")
    _switch(a, "sym", ("--sym", "symmetric grid" + _default(cfg.sym)),
            ("--asym", "asymmetric grid with zero points" + _default(not cfg.sym)))
    _switch(a, "grid_search",
            ("--grid-search", "integer grids: shrink each group's range (by up to 15%%) to the least diag(H)-weighted "
                              "error (default, but for awq: it clips its own way)"),
            ("--no-grid-search", "integer grids: each group's min/max, as GPTQ's reference code"))
    _switch(a, "full_range",
            ("--full-range", "symmetric integer grids: each group's larger extreme on the code -2^(bits-1), the scale "
                             "signed (AutoRound's grid): steps 7/8 as wide at 3 bits, the same files" + _default(cfg.full_range)),
            ("--no-full-range", "symmetric integer grids: GPTQ's +-absmax over 2^bits - 1 steps" + _default(not cfg.full_range)))


def _add_method_args(a: argparse._ArgumentGroup, gptq: GPTQOptions) -> None:
    a.add_argument("--damp", type=float, help=f"GPTQ damping, fraction of mean diag(H) (default {gptq.damp})")
    a.add_argument("--block-size", type=int, help=f"GPTQ lazy-batch block size (default {gptq.block_size})")
    _switch(a, "act_order",
            ("--act-order", "GPTQ: quantize columns by decreasing diag(H), with static groups" + _per_method("act_order")),
            ("--no-act-order", "GPTQ: quantize columns in their natural order"))
    a.add_argument("--static-groups", action="store_const", const=True, help="GPTQ: fix group grids from the unquantized weights")
    a.add_argument("--no-true-sequential", dest="true_sequential", action="store_const", const=False,
                   help="GPTQ: calibrate all linears of a layer on the unquantized layer's inputs")
    a.add_argument("--fp-targets", type=float, metavar="WEIGHT",
                   help="GPTQ/signround: weight in [0, 1] of the unquantized model's outputs in the layer-wise loss "
                        "(0: GPTQ's own, 1: GPTAQ's asymmetric calibration; default 0)")
    a.add_argument("--refit-scales", action="store_const", const=True,
                   help="GPTQ: refit each row's group scales to the layer-wise loss once the codes are chosen "
                        "(integer grids; best with --fp-targets 1)")
    a.add_argument("--iters", type=int, help="signround: signed-gradient steps per decoder layer (default 200)")
    a.add_argument("--lr", type=float, help="signround: first step of the rounding offsets (default 1/iters)")
    a.add_argument("--momentum", type=float,
                   help="signround: step on the sign of a running average of the gradients with this weight (default 0)")
    a.add_argument("--start", choices=["gptq", "rtn"],
                   help="signround: learn from round-to-nearest, as AutoRound does (default), or from GPTQ's codes")
    _switch(a, "awq_clip", ("--awq-clip", "AWQ: search a clipping range per group after scaling" + _per_method("awq_clip")),
            ("--no-awq-clip", "AWQ: skip the clipping search"))
    a.add_argument("--awq-search-tokens", dest="search_tokens", type=int, metavar="N",
                   help="AWQ: tokens a block's scale search runs its candidates over (0: all)" + _per_method("search_tokens"))


def _add_calibration_args(a: argparse._ArgumentGroup, calib: CalibConfig) -> None:
    a.add_argument("--dataset", help="calibration text: wikitext2, c4, pile-val, a .txt/.jsonl/.parquet file or owner/name[:config][@split] "
                                     f"(default: the method's, {_method_defaults('default_dataset')})")
    a.add_argument("--split", help="dataset split (default: train for known sets)")
    a.add_argument("--nsamples", type=int, help=f"calibration windows (default {calib.nsamples})")
    a.add_argument("--seqlen", type=int, help=f"tokens per calibration window (default: the method's, {_method_defaults('default_seqlen')}; "
                                              "capped by the context)")
    a.add_argument("--seed", type=int, help=f"sampling seed (default {calib.seed})")


def _add_output_args(a: argparse._ArgumentGroup, cfg: QuantizeConfig) -> None:
    a.add_argument("--format", choices=sorted([*FORMATS, "gguf"]),
                   help="checkpoint layout (default: gptq, or gptq_v2 for --asym); gguf writes one llama.cpp file at --out; "
                        "bitsandbytes: NF4/FP4 (--bits 4) or LLM.int8 (--bits 8) as transformers saves them")
    a.add_argument("--gguf-type", help=f"with --format gguf: {' '.join(BLOCK_TYPES)} (the method quantizes on that block grid), "
                                       f"{' '.join(MIXES)} (mixes), {' '.join(FLOAT_TYPES)}")
    _add_gguf_tensor_types(a)
    a.add_argument("--bnb-type", dest="bnb_4bit_quant_type", choices=["nf4", "fp4"],
                   help=f"with --format bitsandbytes --bits 4: the 4-bit code table (default {cfg.bnb_4bit_quant_type})")
    a.add_argument("--bnb-double-quant", dest="bnb_4bit_use_double_quant", action="store_const", const=True,
                   help="with --format bitsandbytes --bits 4: quantize the blocks' absmax values again (8-bit)")
    a.add_argument("--dtype", help=f"dtype of unquantized tensors: {', '.join(FLOAT_DTYPES)} (default {cfg.dtype})")
    a.add_argument("--compute-dtype", choices=COMPUTE_DTYPES,
                   help="dtype calibration runs in (default auto: the model's own on a GPU, and on a CPU with bf16 "
                        "matrix units when the model is bf16; else float32)")
    a.add_argument("--max-shard-size", help=f"largest safetensors shard, e.g. 4GB (default {cfg.max_shard_size})")
    a.add_argument("--skip", action="append", help=f"linear name pattern to leave unquantized (repeatable; default {' '.join(cfg.skip)})")
    a.add_argument("--rule", dest="rules", action="append", metavar="REGEX=SPEC",
                   help="per-module precision, first match wins (repeatable): 'down_proj=bits:8', 'layers\\.0\\.=keep', "
                        "'v_proj=type:<a --gguf-type>' with --format gguf; keys bits, group_size, sym, type, keep")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--target-size", help="allocate each linear's bits (and GGUF types) so the weight files fit this size, e.g. 3.9GB")
    g.add_argument("--target-bpw", type=float, help="the same, as bits per parameter of the whole model (embeddings and head included)")


def _add_tuning_args(a: argparse._ArgumentGroup, cfg: QuantizeConfig) -> None:
    a.add_argument("--tune-steps", type=int, metavar="N",
                   help="then tune the group scales (and codes) end to end for N steps on the KL from the unquantized model "
                        "(as `llmq tune`; integer grids, one process; default 0: not)")
    a.add_argument("--tune-lr", type=float, help=f"the tuning's learning rate (default {cfg.tune_lr})")
    a.add_argument("--tune-batch", type=int, help=f"the tuning's calibration windows per step (default {cfg.tune_batch})")
    a.add_argument("--tune-sampled", type=int, metavar="N",
                   help="the tuning also fits N windows the unquantized model writes itself (default: the recipe's, "
                        f"else {cfg.tune_sampled})")
    _switch(a, "tune_head",
            ("--tune-head", "the tuning trains the output head's weights too, where stored in float" + _default(cfg.tune_head)),
            ("--no-tune-head", "the tuning leaves the output head as the source has it" + _default(not cfg.tune_head)))
    _switch(a, "tune_codes",
            ("--tune-codes", "the tuning may move each integer code by one step" + _default(cfg.tune_codes)),
            ("--no-tune-codes", "the tuning keeps every code the quantization wrote" + _default(not cfg.tune_codes)))
    _switch(a, "tune_recompute",
            ("--tune-recompute", "the tuning keeps each decoder layer's inputs alone and forms its activations again in "
                                 "the backward: one layer's activations in memory instead of every layer's, for about "
                                 "1.2x the time" + _default(cfg.tune_recompute)),
            ("--no-tune-recompute", "the tuning keeps every layer's activations for the backward"
                                    + _default(not cfg.tune_recompute)))


def _switch(a: argparse._ArgumentGroup, dest: str, on: tuple[str, str], off: tuple[str, str]) -> None:
    """Two exclusive flags, each (flag, help), that set ``dest`` True or False; neither leaves it None (the
    recipe's or the method's say)."""
    g = a.add_mutually_exclusive_group()
    g.add_argument(on[0], dest=dest, action="store_const", const=True, help=on[1])
    g.add_argument(off[0], dest=dest, action="store_const", const=False, help=off[1])


def _default(on: bool) -> str:
    return " (default)" if on else ""


def _per_method(option: str) -> str:
    """' (default: on for gptq, off for awq+gptq)' for a method option whose default differs per method."""
    values = {m.name: getattr(m.Options(), option) for m in METHODS.values() if hasattr(m.Options(), option)}
    said = {m: ("on" if v else "off") if isinstance(v, bool) else ("all" if v == 0 else v) for m, v in values.items()}
    return " (default: " + ", ".join(f"{v} for {m}" for m, v in said.items()) + ")"


def _method_defaults(attr: str) -> str:
    values = {m.name: getattr(m, attr) for m in METHODS.values() if m.needs_calibration}
    return ", ".join(f"{v} for {m}" for m, v in values.items())


def _add_tune(sub: argparse._SubParsersAction) -> None:
    t, c = TuneOptions(), CalibConfig(dataset=DEFAULT_DATASET)
    p = sub.add_parser("tune", help="tune a quantized checkpoint's scales and codes end to end on the KL from the unquantized model",
                       description="Train a GPTQ/AWQ/compressed-tensors checkpoint's group scales (and the norms' and the "
                                   "head's weights, and each integer code by at most one step) through the whole model on "
                                   "the KL divergence from the unquantized model over calibration windows; writes the same "
                                   "format. Holds both models in memory (it does not stream layers).")
    p.add_argument("--model", required=True, help="the quantized checkpoint (directory or hub id)")
    p.add_argument("--reference", help="the unquantized model it was made from (default: the source its provenance names)")
    p.add_argument("--dataset", default=c.dataset, help=f"calibration text, as for quantize (default {c.dataset})")
    p.add_argument("--split", help="dataset split (default: train for known sets)")
    p.add_argument("--nsamples", type=int, default=c.nsamples, help=f"calibration windows (default {c.nsamples})")
    p.add_argument("--seqlen", type=int, help="tokens per window (default min(2048, context))")
    p.add_argument("--seed", type=int, default=c.seed, help=f"sampling and shuffling seed (default {c.seed})")
    p.add_argument("--steps", type=int, default=t.steps, help=f"Adam steps (default {t.steps})")
    p.add_argument("--lr", type=float, default=t.lr, help=f"learning rate, decaying linearly to 0 (default {t.lr})")
    p.add_argument("--batch", type=int, default=t.batch, help=f"windows per step (default {t.batch})")
    p.add_argument("--sampled", type=int, default=t.sampled, metavar="N",
                   help="also fit N windows the unquantized model writes itself, each from its BOS token, every next "
                        "token drawn from its distribution: they keep the fit on the model's own kind of text where "
                        f"the calibration text is far from it (default {t.sampled})")
    p.add_argument("--no-norms", dest="norms", action="store_false", help="leave the norms' weights as they are")
    p.add_argument("--no-head", dest="head", action="store_false",
                   help="leave the output head as it is (default: trained too, where stored in float)")
    p.add_argument("--no-codes", dest="codes", action="store_false",
                   help="keep every integer code (default: each may move one step where the gradients agree)")
    p.add_argument("--no-codes-check", dest="check_codes", action="store_false",
                   help="tune on every calibration window (default: moving codes, one in 8 is held out, and the moves "
                        "are undone where they raise its KL)")
    p.add_argument("--recompute", action="store_true",
                   help="keep each decoder layer's inputs alone and form its activations again in the backward "
                        "(one layer's activations in memory instead of every layer's, for about 1.2x the time)")
    p.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1)")
    p.add_argument("--compute-dtype", default=t.compute_dtype, choices=["auto", "bfloat16", "float32"],
                   help="dtype of the products (autocast); auto: bfloat16 on a GPU or a CPU with bf16 units, else float32")
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-size", default=QuantizeConfig.max_shard_size)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    calib = CalibConfig(args.dataset, args.split, args.nsamples, args.seqlen, args.seed)
    options = TuneOptions(steps=args.steps, lr=args.lr, batch=args.batch, norms=args.norms, head=args.head,
                          codes=args.codes, check_codes=args.check_codes, seed=args.seed, sampled=args.sampled,
                          compute_dtype=args.compute_dtype, recompute=args.recompute)
    out, r = tune_checkpoint(args.model, args.out, reference=args.reference, calib=calib, options=options,
                             overwrite=args.overwrite, max_shard_size=args.max_shard_size, device=args.device,
                             progress=not args.quiet, trust_remote_code=args.trust_remote_code)
    print(f"wrote {out} in {r.seconds:.1f}s: calibration KL {r.first_loss:.4g} at the start, {r.last_loss:.4g} at the end"
          + (f"; {r.codes_moved} codes moved one step" if options.codes else "") + _undone(r))
    return 0


def _undone(r: TuneResult) -> str:
    u = r.codes_undone
    return "" if u is None else (f" (moves undone at step {u['step']}: held-out KL {u['held_out_kl_undone']:.4g} "
                                 f"without them, {u['held_out_kl_moved']:.4g} with)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity (GPTQ protocol), and KL divergence vs a reference model",
                       description="Perplexity over non-overlapping windows of a tokenized text; with --reference also "
                                   "mean KL divergence and top-1 agreement against that model.")
    p.add_argument("--model", required=True, help="hub id or directory (plain or llmq/GPTQ checkpoint)")
    p.add_argument("--dataset", default="wikitext2", help="wikitext2 (default), c4, a .txt/.jsonl/.parquet file, or owner/name[:config][@split]")
    p.add_argument("--split", help="dataset split (default: test for wikitext2)")
    p.add_argument("--seqlen", type=int, default=None, help="window length (default min(2048, context))")
    p.add_argument("--reference", help="unquantized model to compare against (KL divergence, top-1 agreement)")
    p.add_argument("--dtype", default="float32", help="dtype to evaluate in (default float32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick checks)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def _add_gguf_tensor_types(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--gguf-token-embedding-type", help="GGUF: type of token_embd (default: llama-quantize's, the base type)")
    p.add_argument("--gguf-output-type", help="GGUF: type of the output head (default: llama-quantize's choice)")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-pack a quantized checkpoint in another format (exactly the same codes)",
                       description="Read a quantized checkpoint (gptq, gptq_v2, awq, compressed-tensors; llmq's or another "
                                   "tool's) and write it in another layout, or dequantize it (fp16/bf16/fp32).")
    p.add_argument("--model", required=True, help="quantized checkpoint directory or hub id")
    p.add_argument("--format", required=True, choices=[*FORMATS, *PLAIN, "gguf"])
    p.add_argument("--gguf-type", help="with --format gguf (from a float model): a GGUF type, every tensor rounded to nearest on "
                                       "its grid as llama-quantize does (see quantize --help)")
    _add_gguf_tensor_types(p)
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-size", default=QuantizeConfig.max_shard_size)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_export)


def _add_check_gguf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-gguf", help="run a GGUF file in llama.cpp and compare it with the HF model",
                       description="Tokenizes the text with llama.cpp (from the file alone) and with the HF tokenizer, then "
                                   "runs llama.cpp and transformers on the same windows: perplexity of both, mean KL and "
                                   "top-1 agreement. Needs llama-cpp-python (pip install llmq[llamacpp]).")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--model", required=True, help="the HF model (directory or hub id) the file was made from")
    p.add_argument("--dataset", default="wikitext2", help="evaluation text, as for eval (default wikitext2)")
    p.add_argument("--split", help="dataset split (default: test for wikitext2)")
    p.add_argument("--seqlen", type=int, help="window length (default min(2048, context))")
    p.add_argument("--max-windows", type=int, help="compare only the first N windows")
    p.add_argument("--max-kl", type=float, help="exit 1 when the mean KL exceeds this (the tokenizers must agree too)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_check_gguf)


def cmd_check_gguf(args: argparse.Namespace) -> int:
    tokens, r = check_gguf(args.file, args.model, args.dataset, args.split, args.seqlen, args.max_windows, progress=not args.quiet)
    if tokens.agrees:
        print(f"tokenizer: llama.cpp and HF agree on all {tokens.hf_tokens} tokens")
    else:
        print(f"tokenizer: llama.cpp and HF DIFFER from token {tokens.first_difference} "
              f"({tokens.llama_cpp_tokens} vs {tokens.hf_tokens} tokens): llama.cpp's perplexity tools would score other tokens")
    print(f"on HF's tokens, {r.windows} windows of {r.seqlen}:")
    print(f"  perplexity  HF (transformers) {r.reference_ppl:.4f}   llama.cpp {r.ppl:.4f}")
    print(f"  mean KL(HF || llama.cpp) {r.kld:.6f}   top-1 agreement {100 * r.top1:.2f}%")
    if args.max_kl is not None and (not tokens.agrees or not r.kld <= args.max_kl):
        return 1
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="size/accuracy report: quantize several ways, evaluate, project to Llama-2-7B",
                       description="Runs (or reuses) every variant of a suite, evaluates each against the FP32 model and "
                                   "writes report.md, report.csv, report.json and size_vs_ppl.png. Interrupted reports resume.")
    p.add_argument("--model", required=True)
    p.add_argument("--suite", default="configs/suites/default.yaml")
    p.add_argument("--out", required=True, help="report directory (variants are kept here, so re-runs resume)")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=DATASET",
                   help="map a suite eval name to a dataset spec, e.g. wikitext2=path/to/test.parquet")
    p.add_argument("--calib-dataset", help="calibration text for every calibrated variant (overrides the suite)")
    p.add_argument("--nsamples", type=int, help="calibration windows (overrides the suite)")
    p.add_argument("--seqlen", type=int, help="calibration and evaluation window (default min(2048, context))")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows of each dataset (quick runs)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    eval_paths = {}
    for item in args.eval:
        name, sep, spec = item.partition("=")
        if not sep:
            raise LlmqError(f"--eval takes NAME=DATASET, got {item!r}")
        eval_paths[name] = spec
    suite = load_suite(args.suite)
    command = "python -m llmq " + shlex.join(sys.argv[1:])
    run_report(args.model, suite, args.out, eval_paths=eval_paths, seqlen=args.seqlen, calib_dataset=args.calib_dataset,
               nsamples=args.nsamples, max_windows=args.max_windows, progress=not args.quiet, command=command)
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a checkpoint or GGUF file to the Hugging Face Hub with a generated model card",
                       description="Uploads DIR (a checkpoint directory, or one .gguf file) in one commit with a generated "
                                   "model card as its README.md (DIR itself is not written to). The token comes from "
                                   "HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another hub.")
    p.add_argument("dir", help="checkpoint directory or .gguf file")
    p.add_argument("--repo-id", required=True, help="user/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the files, upload nothing")
    p.add_argument("--card", help="also write the generated model card to this file (outside DIR), e.g. to review it")
    p.add_argument("--base-model", help="hub id of the source model for the card (default: from the provenance)")
    p.add_argument("--report", help="report.json whose row(s) for this checkpoint go into the card")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    files = push(args.dir, args.repo_id, private=args.private, dry_run=args.dry_run, base_model=args.base_model,
                 report=args.report, card_out=args.card)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(files)} files to {args.repo_id}{' (private)' if args.private else ''}:")
    for f in files:
        print(f"  {f}")
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-hash a checkpoint against its provenance record",
                       description="Exit 0 if every file matches llmq_provenance.json, 1 if anything was modified, removed or added.")
    p.add_argument("dir")
    p.set_defaults(func=cmd_verify)


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        if not args.gguf_type:
            raise LlmqError("--format gguf needs --gguf-type")
        for n in export_gguf(args.model, args.out, args.gguf_type, overwrite=args.overwrite,
                             token_embedding_type=args.gguf_token_embedding_type, output_type=args.gguf_output_type):
            print(f"note: {n}")
        print(f"wrote {args.out} (GGUF {args.gguf_type.upper()})")
        return 0
    out = export_checkpoint(args.model, args.format, args.out, max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    print(f"wrote {out} ({args.format})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    if is_gguf_file(d):
        raise LlmqError(f"{args.dir!r} is a GGUF file: its provenance is in its metadata (llmq.provenance) and holds no "
                        f"hash of the file itself to re-check; `llmq push {args.dir} --repo-id ID --dry-run --card CARD` shows it")
    if not d.is_dir():
        raise LlmqError(f"{args.dir!r} is not a directory")
    problems = verify(d)
    for p in problems:
        print(p)
    print(f"{d}: {'OK, every file matches its recorded sha256' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def peak_rss_mib() -> float:
    """This process's peak resident memory.  Linux's VmHWM belongs to the process image, whereas ru_maxrss
    survives exec: a child started by a large parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (KiB on Linux, bytes on macOS)


def _write_stats(path: str | None, seconds: float) -> None:
    if path:
        Path(path).write_text(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib()}) + "\n")


def cmd_quantize(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.config) if args.config else {}
    overrides = {k: getattr(args, k) for k in ("method", "bits", "group_size", "sym", "grid_search", "full_range", "damp", "block_size", "act_order",
                                               "static_groups", "true_sequential", "awq_clip", "search_tokens", "fp_targets", "refit_scales",
                                               "iters", "lr", "start", "momentum",
                                               "dataset", "split", "nsamples",
                                               "seqlen", "seed", "format", "gguf_type", "gguf_token_embedding_type", "gguf_output_type",
                                               "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                                               "dtype", "compute_dtype", "max_shard_size", "skip", "rules", "target_size", "target_bpw",
                                               "tune_steps", "tune_lr", "tune_batch", "tune_sampled", "tune_head", "tune_codes", "tune_recompute")}
    cfg = build_config(recipe, overrides)
    source = ModelSource(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code,
                         allow_nonfinite=args.allow_nonfinite)
    ranks, device = distributed.join(args.device)  # (alone unless launched by torchrun)
    try:
        if cfg.tune_steps:
            if args.resume:
                raise LlmqError("--resume does not continue a run with tune_steps; run it again without --resume")
            stats = quantize_then_tune(source, cfg, args.out, overwrite=args.overwrite, device=device,
                                       progress=not args.quiet, ranks=ranks)
        else:
            stats = quantize_model(source, cfg, args.out, overwrite=args.overwrite, device=device, progress=not args.quiet,
                                   resume=args.resume, ranks=ranks)
    finally:
        distributed.leave()
    if not ranks.leader:
        return 0  # rank 0 says what was written
    _write_stats(args.stats_json, stats.seconds)
    if stats.allocation is not None:
        print(stats.allocation.render())
    if args.save_recipe:
        save_recipe(args.save_recipe, cfg, stats.allocation.rules() if stats.allocation else ())
        print(f"saved the recipe to {args.save_recipe}")
    for n in stats.notes:
        print(f"note: {n}")
    out = Path(stats.output)
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.glob("*.safetensors"))
    if cfg.format == "gguf":
        print(f"wrote {out} ({size / 2**20:.1f} MiB) in {stats.seconds:.1f}s: {cfg.method} on the {cfg.gguf_type.upper()} grids")
    else:
        on = f" on the {stats.grid} grid" if stats.grid else ""
        tuned = f", scales tuned end to end ({cfg.tune_steps} steps)" if cfg.tune_steps else ""
        print(f"wrote {out} ({size / 2**20:.1f} MiB of weights) in {stats.seconds:.1f}s: {cfg.method}{on}{tuned}")
    errors = [r["error"] for r in stats.records if "error" in r]
    if errors:
        worst = max(stats.records, key=lambda r: r.get("error", -1))
        print(f"reconstruction error (relative ||WX-QX||^2): mean {sum(errors) / len(errors):.4g}, "
              f"worst {worst['error']:.4g} at layer {worst['layer']} {worst['module']}")
        fallbacks = [r for r in stats.records if r.get("fallback_rtn")]
        if fallbacks:
            print(f"warning: {len(fallbacks)} modules fell back to RTN: no positive-definite Hessian, or (experts) no calibration token routed to them; see llmq_quantize_log.jsonl")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    dtype = torch_dtype(args.dtype)
    model, tokenizer, context = load_for_eval(args.model, dtype, trust_remote_code=args.trust_remote_code)
    seqlen = args.seqlen or min(2048, context or 2048)
    if seqlen < 2:
        raise LlmqError(f"--seqlen must be at least 2, got {seqlen}")
    if context is not None and seqlen > context:
        raise LlmqError(f"--seqlen {seqlen} exceeds the model's context length {context}")
    reference = None
    if args.reference:
        reference, _, _ = load_for_eval(args.reference, dtype, trust_remote_code=args.trust_remote_code)
        if reference.get_output_embeddings().weight.shape[0] != model.get_output_embeddings().weight.shape[0]:
            raise LlmqError("--reference has a different vocabulary size; KL divergence needs the same tokenizer")
    tokens = eval_tokens(tokenizer, args.dataset, args.split)
    if args.max_windows:
        tokens = tokens[: args.max_windows * seqlen]
    model.to(args.device)
    if reference is not None:
        reference.to(args.device)
    r = evaluate(model, tokens, seqlen, reference, device=args.device, progress=not args.quiet, batch_size=args.batch_size)
    if not math.isfinite(r.ppl) or (reference is not None and not math.isfinite(r.kld)):
        raise LlmqError(f"the perplexity of {args.model!r} is not finite ({r.ppl}): its weights or activations overflow")
    print(f"model {args.model}  dataset {args.dataset}  seqlen {seqlen}  windows {r.windows}  tokens scored {r.tokens_scored}")
    print(f"perplexity {r.ppl:.4f}")
    if reference is not None:
        print(f"reference {args.reference}: perplexity {r.reference_ppl:.4f}  mean KL {r.kld:.6f}  top-1 agreement {100 * r.top1:.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "dataset": args.dataset, "reference": args.reference,
                                               **r.to_dict()}, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmq", description="Calibrated LLM weight quantization (RTN, GPTQ, AWQ) with layer streaming, exported to GPTQ, AWQ and compressed-tensors checkpoints.")
    parser.add_argument("--version", action="version", version=f"llmq {llmq.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quantize(sub)
    _add_export(sub)
    _add_tune(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_check_gguf(sub)
    _add_push(sub)
    _add_verify(sub)
    return parser


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (main() may run more than once in a process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _setup_logging() -> None:
    """llmq's messages as 'llmq: ...'; other libraries' warnings under their own names ('gguf.vocab: ...'),
    never as llmq's."""
    ours = logging.getLogger("llmq")
    if not ours.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("llmq: %(message)s"))
        ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(logging.INFO if os.environ.get("LLMQ_VERBOSE") else logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    transformers.logging.set_verbosity_error()  # its advice targets training code, not this tool's users


# Failures of the machine, not of llmq: said in one line, like a user error.
_SYSTEM_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EIO: "input/output error"}


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    with interrupts.stop_on_signals():  # SIGTERM stops a run as Ctrl-C does: outputs discarded or kept for --resume
        try:
            return args.func(args)
        except Exception as e:
            if interrupts.received():  # a library turned the KeyboardInterrupt into an error of its own
                return _interrupted(args)
            if isinstance(e, LlmqError):
                print(f"llmq: error: {e}", file=sys.stderr)
                return 2
            if oom := out_of_memory(e):
                print(f"llmq: error: {oom}", file=sys.stderr)
                return 2
            if not (isinstance(e, OSError) and e.errno in _SYSTEM_ERRORS):
                raise
            where = f" ({e.filename})" if e.filename else ""
            print(f"llmq: error: {_SYSTEM_ERRORS[e.errno]}{where}; nothing was written", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return _interrupted(args)


def _interrupted(args: argparse.Namespace) -> int:
    resumable = getattr(args, "out", None) and Path(args.out).with_name(f".{Path(args.out).name}.llmq-tmp").is_dir()
    hint = "; run the same command with --resume to continue" if resumable and args.command == "quantize" else ""
    print(f"llmq: interrupted{hint}", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
