#!/usr/bin/env python
"""Bit allocation against uniform recipes and llama.cpp's mixes at the same file size.

Checkpoints (GPTQ, unquantized tensors fp16): uniform W2/W3/W4/W8 g128, then an allocation at the exact
size of W3 g128 and of W4 g128, once free to quantize the head (GPTQ stores it) and once with the head kept
in fp16 like the uniform files.  GGUF: llama-quantize's Q3_K_M and Q4_K_M made with an importance matrix
from the calibration text (llama-imatrix), llmq's GPTQ files of the base types, and llmq's allocation at the
size of each llama.cpp mix.  Every file is scored by llmq's own reader against the FP32 model (KL, top-1,
perplexity) and, with --llama-cpp-bin, GGUF files also by `llama-perplexity --kl-divergence`.  The
allocations are projected onto Llama-2-7B (each 7B layer takes the choice of the layer at the same depth).

    python scripts/compare_allocation.py --model ../shared/assets/models/llmq-ref-6m \
        --calib ../shared/assets/datasets/c4-sample/c4_sample_200docs.jsonl \
        --eval ../shared/assets/datasets/wikitext-2-raw-v1/test-00000-of-00001.parquet \
        --eval-raw ../shared/assets/datasets/wikitext-2-raw-v1/wiki.test.raw \
        --llama-cpp-bin PATH --out eval/results/allocation-llmq-ref-6m
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))


def llama_cpp_kl(bin_dir: Path, base: Path, f: Path, text: str, ctx: int, chunks: int) -> float:
    out = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(f), "-f", text, "-c", str(ctx), "--chunks", str(chunks),
                          "--kl-divergence-base", str(base), "--kl-divergence"], capture_output=True, text=True, check=True)
    return float(re.search(r"Mean\s+KLD:\s+([0-9.eE+-]+)", out.stdout + out.stderr)[1])


def project_7b(allocation, model_layers: int, config: Path, fmt_name: str) -> int:
    """The allocation's choices carried to Llama-2-7B by depth and role; exact tensor bytes (headers aside)."""
    from llmq.arch import decoder_linears
    from llmq.formats import FORMATS
    from llmq.projection import meta_model

    model = meta_model(config)
    fmt = FORMATS[fmt_name]
    n = model.config.num_hidden_layers
    by_role = {(u.layer, m.split(".")[-1]): u.options[c].grid for u, c in zip(allocation.units, allocation.choice)
               for m in u.modules}
    total, seen = 0, set()
    for name, lin in decoder_linears(model).items():
        i = int(name.split(".")[2])
        grid = by_role[(i * model_layers // n, name.split(".")[-1])]
        total += lin.weight.numel() * 2 if grid is None else fmt.nbytes(lin.out_features, lin.in_features, grid)
        seen.add(id(lin.weight))
    head_grid = by_role.get((None, "lm_head"))
    for pname, p in model.named_parameters():
        if id(p) in seen:
            continue
        if pname == "lm_head.weight" and head_grid is not None:
            total += fmt.nbytes(p.shape[0], p.shape[1], head_grid)
        else:
            total += p.numel() * 2
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True, help="evaluation text for llmq's reader (dataset spec)")
    ap.add_argument("--eval-raw", help="the same text as a raw file, for llama-perplexity")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--max-windows", type=int, default=300)
    ap.add_argument("--llama-cpp-bin", type=Path, help="directory with llama-quantize, llama-imatrix, llama-perplexity")
    ap.add_argument("--projection", type=Path, default=ROOT / "configs/models/llama-2-7b.json")
    ap.add_argument("--out", required=True, help="path prefix: writes OUT.md, OUT.json and OUT.png")
    args = ap.parse_args()

    from llmq.checkpoint import load_for_eval, load_model
    from llmq.data import eval_tokens
    from llmq.eval import evaluate
    from llmq.export import export_gguf
    from llmq.pipeline import quantize_model
    from llmq.recipe import build_config
    from llmq.source import ModelSource

    reference, source = load_model(args.model)
    tokens = eval_tokens(source.tokenizer(), args.eval)[: args.max_windows * args.seqlen]
    calib = {"dataset": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "method": "gptq"}
    rows: list[dict] = []
    n_layers = source.config.num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def score(label: str, kind: str, path: Path, stats=None, llama_kl: float | None = None) -> dict:
            model, _, _ = load_for_eval(str(path))
            r = evaluate(model, tokens, args.seqlen, reference=reference, progress=False)
            row = {"variant": label, "kind": kind, "bytes": size_of(path), "kl": r.kld, "top1": r.top1, "ppl": r.ppl,
                   "llama_cpp_kl": llama_kl}
            if stats is not None and stats.allocation is not None:
                row["budget"] = stats.allocation.budget
                row["predicted_kl"] = stats.allocation.predicted_kl
                if path.is_dir():
                    row["projected_7b_bytes"] = project_7b(stats.allocation, n_layers, args.projection, "gptq")
            rows.append(row)
            print(json.dumps(row), flush=True)
            return row

        def quantize(name: str, **over):
            cfg = build_config({}, {**calib, **over})  # (a fresh source: load_model's one has tied the reference's head)
            return quantize_model(ModelSource(args.model), cfg, tmp / name, progress=False)

        # ---- checkpoints
        sizes = {}
        for bits in (2, 3, 4, 8):
            s = quantize(f"w{bits}", bits=bits, group_size=128)
            sizes[bits] = size_of(s.output)
            score(f"GPTQ W{bits} g128 (uniform)", "uniform", s.output)
        for bits in (3, 4):
            s = quantize(f"a{bits}", bits=bits, group_size=128, target_size=sizes[bits])
            score(f"allocated at W{bits} g128 size", "allocated", s.output, s)
            s = quantize(f"a{bits}k", bits=bits, group_size=128, target_size=sizes[bits], rules=[r"^lm_head$=keep"])
            score(f"allocated at W{bits} g128 size, head fp16", "allocated (head fp16)", s.output, s)

        # ---- GGUF
        gguf_rows = []
        base = None
        if args.llama_cpp_bin:
            b = args.llama_cpp_bin
            export_gguf(args.model, tmp / "f32.gguf", "F32")
            text = tmp / "calib.txt"
            text.write_text("\n\n".join(source_texts(args.calib)))
            subprocess.run([str(b / "llama-imatrix"), "-m", str(tmp / "f32.gguf"), "-f", str(text), "-o", str(tmp / "imatrix.dat"),
                            "-c", str(args.seqlen), "--chunks", str(args.nsamples)], capture_output=True, check=True)
            if args.eval_raw:
                base = tmp / "base.kld"
                subprocess.run([str(b / "llama-perplexity"), "-m", str(tmp / "f32.gguf"), "-f", args.eval_raw, "-c", str(args.seqlen),
                                "--chunks", str(args.max_windows), "--kl-divergence-base", str(base)], capture_output=True, check=True)
            for mix in ("Q3_K_M", "Q4_K_M"):
                f = tmp / f"llamacpp-{mix}.gguf"
                subprocess.run([str(b / "llama-quantize"), "--imatrix", str(tmp / "imatrix.dat"), str(tmp / "f32.gguf"), str(f), mix],
                               capture_output=True, check=True)
                gguf_rows.append((f"llama.cpp {mix} (imatrix)", "llama.cpp mix", f, None))
                s = quantize(f"alloc-{mix}.gguf", format="gguf", gguf_type=mix[:4], target_size=size_of(f))
                gguf_rows.append((f"allocated at llama.cpp {mix} size", "allocated GGUF", s.output, s))
        for t in ("Q3_K", "Q4_K", "Q4_K_M"):
            s = quantize(f"gptq-{t}.gguf", format="gguf", gguf_type=t)
            gguf_rows.append((f"GPTQ {t} (uniform)", "uniform GGUF", s.output, None))
        for label, kind, f, s in gguf_rows:
            kl = llama_cpp_kl(args.llama_cpp_bin, base, f, args.eval_raw, args.seqlen, args.max_windows) if base else None
            score(label, kind, f, s, kl)

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write(rows, Path(args.out), command, args)


def source_texts(spec: str) -> list[str]:
    from llmq.data import load_rows

    return load_rows(spec, purpose="calibration")


def write(rows: list[dict], out: Path, command: str, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [f"# Bit allocation vs uniform recipes and llama.cpp's mixes ({Path(args.model).name})", "",
             f"Command: `{command}`", "",
             f"Eval: first {args.max_windows} windows of {args.seqlen} tokens of `{args.eval}` against the FP32 model. "
             f"Calibration (GPTQ, imatrix, allocation probes): {args.nsamples} windows of `{args.calib}`.", "",
             "| variant | bytes | MiB | mean KL (llmq) | KL (llama-perplexity) | top-1 | ppl | predicted KL | 7B projection GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lk = f"{r['llama_cpp_kl']:.5f}" if r.get("llama_cpp_kl") is not None else ""
        pk = f"{r['predicted_kl']:.5f}" if r.get("predicted_kl") is not None else ""
        p7 = f"{r['projected_7b_bytes'] / 1e9:.3f}" if r.get("projected_7b_bytes") else ""
        lines.append(f"| {r['variant']} | {r['bytes']:,} | {r['bytes'] / 2**20:.3f} | {r['kl']:.5f} | {lk} | "
                     f"{100 * r['top1']:.2f}% | {r['ppl']:.3f} | {pk} | {p7} |")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    plot(rows, Path(f"{out}.png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    markers = {"uniform": "o", "allocated": "*", "allocated (head fp16)": "P", "uniform GGUF": "s",
               "llama.cpp mix": "^", "allocated GGUF": "X"}
    for kind, m in markers.items():
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter([r["bytes"] / 2**20 for r in pts], [r["kl"] for r in pts], marker=m, s=80, label=kind, zorder=3)
            for r in pts:
                ax.annotate(r["variant"], (r["bytes"] / 2**20, r["kl"]), textcoords="offset points", xytext=(5, 3), fontsize=6)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL vs FP32 (nats/token, log)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
