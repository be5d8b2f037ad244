#!/usr/bin/env python
"""Wall time, peak RSS and (optionally) accuracy of GPTQ runs on the same model and calibration.

Each run happens in a fresh process on the same calibration token ids; llmq's RTN is the
baseline of the time and memory ratios.  When `llmcompressor` or `gptqmodel` are installed,
the same recipe (W4, group 128, symmetric, damp 0.01, static act-order; AWQ with zero points) is
also run through them (not part of CI; those packages are optional, and may live in their own
virtualenvs: --peer llmcompressor=/path/to/venv/bin/python).  With --eval-dataset every output is
read back by `llmq eval` and compared with the source model (mean KL, top-1, perplexity),
so all tools' files are measured by the same code.

    python scripts/bench_quantize.py --model ../shared/assets/models/llmq-ref-6m --seqlen 256 \
        --calib-dataset c4 --eval-dataset wikitext2
    python scripts/bench_quantize.py --random-hidden 2048 --random-inter 5632 --random-layers 4 \
        --nsamples 32 --seqlen 2048 --methods gptq-act,awq --peer gptqmodel=../peers/gptqmodel/bin/python
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from importlib.metadata import version
tool, method, src, out, ids_path, bits, gs, fast_recipe = sys.argv[1:9]
bits, gs = int(bits), int(gs)
ids = torch.load(ids_path)
nsamples, seqlen = ids.shape
act_order = method == "gptq-act"
sym = method != "awq"  # AWQ as its authors and every tool ship it: with zero points
# Tensors left unquantized keep the source's dtype, as the other tools keep them: only the method differs.
from transformers import AutoConfig
dtype = str(getattr(AutoConfig.from_pretrained(src), "dtype", None) or "float32").removeprefix("torch.")
t0 = time.perf_counter()
if tool == "llmq":
    from llmq.recipe import build_config, load_recipe
    from llmq.pipeline import quantize_model
    from llmq.source import ModelSource
    # "fast": the fast-w4g128 recipe (GPTQ, act-order, fp_targets, grid search, refit) at these bits and groups
    recipe = load_recipe(fast_recipe) if method == "fast" else {"method": method.split("-")[0]}
    cfg = build_config(recipe, {"bits": bits, "group_size": gs, "nsamples": nsamples,
                                "seqlen": seqlen, "dtype": dtype, "sym": sym,
                                **({"act_order": act_order} if method.startswith("gptq") else {})})
    quantize_model(ModelSource(src), cfg, out, progress=False, calib_ids=ids)
elif tool == "llmcompressor":
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if gs > 0 else "channel",
                               group_size=gs if gs > 0 else None)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache
        if not torch.cuda.is_available():  # (0.14 pins its cache for GPU copies, which fails without a GPU)
            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    else:
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01,
                              actorder="static" if act_order else None)
    oneshot(model=src, dataset=ds, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=nsamples,
            output_dir=out)
elif tool == "gptqmodel":
    from gptqmodel import GPTQModel, QuantizeConfig
    if method == "awq":  # (7.6 refuses it without CUDA: "AWQ: CUDA is not available")
        qcfg = QuantizeConfig(bits=bits, group_size=gs, sym=False, method="awq", format="gemm")
    else:  # act_group_aware (its default reordering) off: plain GPTQ, or act-order with static groups, as above
        qcfg = QuantizeConfig(bits=bits, group_size=gs, sym=True, desc_act=act_order, static_groups=act_order,
                              act_group_aware=False, damp_percent=0.01)
    model = GPTQModel.load(src, qcfg)
    model.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * seqlen} for r in ids])
    model.save(out)
seconds = time.perf_counter() - t0
versions = {p: version(p) for p in ("torch", "transformers", {"llmq": "llmq"}.get(tool, tool))}
print(json.dumps({"seconds": seconds, "versions": versions,
                  "peak_rss_mib": [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]}))
"""

OTHER_TOOLS = ("llmcompressor", "gptqmodel")
PEER_METHODS = ("gptq", "gptq-act", "awq")  # (the peers have no "fast": llmq's alone)
FAST_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "fast-w4g128.yaml"


def child_env(tool: str) -> dict[str, str]:
    """The environment a tool's child process runs in."""
    env = dict(os.environ)
    if tool == "gptqmodel":  # its default thread pools ask for more CPU workers than a 2-core machine gives
        env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    return env


def peak_rss_mib(pid: int) -> float:
    """A running process's peak resident memory so far (VmHWM), MiB (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), 0.0)
    except OSError:
        return 0.0


def run(tool: str, method: str, python: str, src: str, out: Path, ids_path: Path, args) -> dict | None:
    """One tool's run in a fresh process.  A peer still running after --peer-timeout seconds is stopped and
    reported with ``cut_off``: its time and its peak memory so far are lower bounds of its own.  A run killed
    by a signal (the kernel's out-of-memory killer sends SIGKILL) is reported with ``killed``: its peak memory
    so far (sampled every few seconds; VmHWM is a high-water mark) is a lower bound, its time is none."""
    proc = subprocess.Popen([python, "-c", CHILD, tool, method, src, str(out), str(ids_path), str(args.bits),
                             str(args.group_size), str(FAST_RECIPE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(tool))
    limit = None if tool == "llmq" else args.peer_timeout
    start, peak = time.monotonic(), 0.0
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=5)
            break
        except subprocess.TimeoutExpired:
            peak = max(peak, peak_rss_mib(proc.pid))
            if limit is not None and time.monotonic() - start >= limit:
                proc.kill()
                proc.communicate()
                print(f"{tool} {method}: stopped after {limit} s (peak RSS so far {peak:.0f} MiB)", file=sys.stderr)
                return {"seconds": float(limit), "peak_rss_mib": peak, "cut_off": True, "versions": {}}
    if proc.returncode < 0:
        seconds, name = time.monotonic() - start, signal.Signals(-proc.returncode).name
        print(f"{tool} {method}: killed by {name} after {seconds:.0f} s (peak RSS so far {peak:.0f} MiB; "
              "out of memory?)", file=sys.stderr)
        return {"seconds": seconds, "peak_rss_mib": peak, "cut_off": True, "killed": name, "versions": {}}
    if proc.returncode != 0:
        print(f"{tool} {method}: failed\n{stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(stdout.strip().splitlines()[-1])


def peers(args) -> dict[str, str]:
    """Each other tool and the Python that runs it: ``--peer tool=python`` (its own virtualenv), else this
    Python if the tool is installed next to llmq."""
    given = dict(p.split("=", 1) for p in args.peer)
    unknown = set(given) - set(OTHER_TOOLS)
    if unknown:
        sys.exit(f"bench_quantize: unknown peer {sorted(unknown)[0]!r} (known: {', '.join(OTHER_TOOLS)})")
    found = {t: sys.executable for t in OTHER_TOOLS if t not in given and importlib.util.find_spec(t) is not None}
    return {**given, **found}


def evaluate(out: Path, src: str, args) -> dict | None:
    """The output read back by llmq's loader and compared with the source model."""
    js = out.with_suffix(".eval.json")
    cmd = [sys.executable, "-m", "llmq", "eval", "--model", str(out), "--reference", src, "--dataset", args.eval_dataset,
           "--seqlen", str(args.seqlen), "--json", str(js), "--quiet"]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"eval of {out.name}: failed\n{p.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(js.read_text())


def calibration_ids(src: str, args) -> "torch.Tensor":  # noqa: F821
    import torch

    if args.calib_dataset is None:  # random ids: timing only
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(src).vocab_size
        return torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    from llmq.data import calibration_tokens
    from llmq.source import ModelSource

    return calibration_tokens(ModelSource(src).tokenizer(), args.calib_dataset, args.nsamples, args.seqlen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local model directory (default: a random Llama built here)")
    ap.add_argument("--random-hidden", type=int, default=1024)
    ap.add_argument("--random-inter", type=int, help="MLP width of the random Llama (default 4 x hidden)")
    ap.add_argument("--random-layers", type=int, default=4)
    ap.add_argument("--random-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the random Llama (default bfloat16, as most checkpoints ship; each tool computes in it "
                         "or as it chooses: GPTQModel in bf16 on CPU whatever the source)")
    ap.add_argument("--methods", default="gptq,gptq-act", help="comma-separated, of gptq, gptq-act, awq, fast (llmq's fast-* recipe; rtn runs always)")
    ap.add_argument("--peer", action="append", default=[], metavar="TOOL=PYTHON",
                    help="run TOOL (llmcompressor, gptqmodel) with this Python (e.g. its own virtualenv's)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-dataset", help="calibration text (llmq dataset spec); default: random token ids")
    ap.add_argument("--eval-dataset", help="also evaluate every output against the source model on this text")
    ap.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    ap.add_argument("--peer-timeout", type=float, help="stop a peer's run after this many seconds and report lower "
                                                       "bounds of its time and memory (default: no limit)")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        src = args.model
        if src is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_memory import make_model

            src = str(Path(tmp) / "random-llama")
            make_model(Path(src), args.random_layers, args.random_hidden, 32000, tokenizer=True, inter=args.random_inter,
                       dtype=args.random_dtype)
        ids_path = Path(tmp) / "ids.pt"
        torch.save(calibration_ids(src, args), ids_path)
        methods = args.methods.split(",")
        others = peers(args)
        pythons = {"llmq": sys.executable, **others}
        runs = [("llmq", "rtn")] + [(t, m) for m in methods for t in ("llmq", *(others if m in PEER_METHODS else ()))]
        results = {}
        for tool, method in runs:
            out = Path(tmp) / f"{tool}-{method}"
            r = run(tool, method, pythons[tool], src, out, ids_path, args)
            if r is not None and args.eval_dataset:
                r["eval"] = evaluate(out, src, args)
            if r is not None:
                results[(tool, method)] = r
        base = results.get(("llmq", "rtn"))
        dtype = "" if args.model else f" ({args.random_dtype})"
        print(f"\nmodel {src}{dtype}  W{args.bits} g{args.group_size}  calibration {args.nsamples} x {args.seqlen} tokens "
              f"({args.calib_dataset or 'random ids'})")
        head = f"{'tool':15s} {'method':9s} {'seconds':>9s} {'x rtn':>7s} {'peak RSS MiB':>13s} {'x rtn':>7s}"
        if args.eval_dataset:
            head += f" {'mean KL':>9s} {'top-1':>7s} {'perplexity':>11s}"
        print(head)
        for (tool, method), r in results.items():
            rt = r["seconds"] / base["seconds"] if base else float("nan")
            rm = r["peak_rss_mib"] / base["peak_rss_mib"] if base else float("nan")
            more = ">" if r.get("cut_off") else " "  # (stopped: lower bounds)
            line = f"{tool:15s} {method:9s} {more}{r['seconds']:8.2f} {rt:7.2f} {more}{r['peak_rss_mib']:12.0f} {rm:7.2f}"
            if r.get("killed"):
                line += f"  (killed by {r['killed']}: no time to compare)"
            if args.eval_dataset:
                e = r.get("eval")
                line += (f" {e['kld']:9.5f} {100 * e['top1']:6.2f}% {e['ppl']:11.4f}" if e
                         else "   (eval failed)")
            print(line)
        print("versions: " + "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
                                       for t, r in {t: r for (t, _), r in results.items() if r["versions"]}.items()))
        for method in methods:
            mine, theirs = results.get(("llmq", method)), [r for (t, m), r in results.items() if t != "llmq" and m == method]
            if mine and theirs:
                timed = [r for r in theirs if not r.get("killed")]  # (a killed run has no time to finish in)
                at_most = lambda rs: "<=" if any(r.get("cut_off") for r in rs) else "="  # (stopped: lower bounds)
                speed = (f"llmq time / fastest peer's {at_most(timed)} {mine['seconds'] / min(r['seconds'] for r in timed):.2f}"
                         if timed else "no peer finished")
                print(f"{method}: {speed}; peak RSS / lowest peer's {at_most(theirs)} "
                      f"{mine['peak_rss_mib'] / min(r['peak_rss_mib'] for r in theirs):.2f}")
        fast, gptq = results.get(("llmq", "fast")), results.get(("llmq", "gptq-act"))
        if fast and gptq:  # (the bar for the fast preset: at most twice GPTQ's time)
            print(f"fast: time / llmq gptq-act's = {fast['seconds'] / gptq['seconds']:.2f}; "
                  f"peak RSS / llmq gptq-act's = {fast['peak_rss_mib'] / gptq['peak_rss_mib']:.2f}")
        missing = [t for t in OTHER_TOOLS if t not in others]
        if missing:
            print(f"(not installed, skipped: {', '.join(missing)})")


if __name__ == "__main__":
    main()
