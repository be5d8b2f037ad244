"""Peak memory and wall time of `quantize --format gguf` against the same run with `--format gptq`.

Each run is its own process (`--stats-json`: wall time and peak RSS).  Models: the ones given, and with
`--big-vocab` a random Gemma 3-shaped model with a 262,144-token tied embedding (hidden 640), where the
embedding dominates.  `--old-tree` also runs an older llmq checkout (e.g. a `git worktree` of the commit
before the GGUF sink) on the same recipes, for the ratio against its two-step GGUF path.

    python scripts/bench_gguf_sink.py --model ../shared/assets/models/llmq-ref-6m --big-vocab \
        --dataset ../shared/assets/datasets/c4-sample/c4_sample_200docs.jsonl --old-tree /tmp/oldmain
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLMQ_ASSETS", ROOT.parent / "shared" / "assets"))


BIG_VOCAB = """
import json, shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
path, assets = Path(sys.argv[1]), Path(sys.argv[2])
cfg = AutoConfig.for_model("gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                           sliding_window=512, max_position_embeddings=32768, tie_word_embeddings=True,
                           bos_token_id=0, eos_token_id=1, pad_token_id=None)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)
# llmq-ref-6m's tokenizer with unused entries up to the embedding's size (llmq before the GGUF sink
# refused a tokenizer shorter than the embedding)
tj = json.loads((assets / "models" / "llmq-ref-6m" / "tokenizer.json").read_text())
vocab = tj["model"]["vocab"]
vocab.update({f"<unused{i}>": i for i in range(len(vocab), cfg.vocab_size)})
(path / "tokenizer.json").write_text(json.dumps(tj))
shutil.copy(assets / "models" / "llmq-ref-6m" / "tokenizer_config.json", path / "tokenizer_config.json")
"""


def big_vocab_model(path: Path) -> Path:
    """A random Gemma 3 270M-shaped model (6 layers) with its 262,144-token tied embedding, bf16 (built in a
    process of its own: this one stays small, so its children's memory is theirs alone)."""
    subprocess.run([sys.executable, "-c", BIG_VOCAB, str(path), str(ASSETS)], check=True, capture_output=True)
    return path


def run(tree: Path, model: Path, out: Path, fmt: list[str], dataset: str, nsamples: int, seqlen: int) -> dict:
    stats = out.with_suffix(".stats.json")
    cmd = [sys.executable, "-m", "llmq", "quantize", "--quiet", "--method", "gptq", "--model", str(model), "--out", str(out),
           "--dataset", dataset, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--stats-json", str(stats), *fmt]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    p = subprocess.run(cmd, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(stats.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="*", default=[])
    ap.add_argument("--big-vocab", action="store_true")
    ap.add_argument("--dataset", required=True, type=lambda p: str(Path(p).resolve()))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--gguf-type", default="Q4_0")
    ap.add_argument("--old-tree", help="an older llmq checkout to run the same recipes with")
    args = ap.parse_args()
    trees = {"this": ROOT, **({"old": Path(args.old_tree)} if args.old_tree else {})}
    with tempfile.TemporaryDirectory() as tmp:
        models = [Path(m).resolve() for m in args.model] + ([big_vocab_model(Path(tmp) / "gemma3-262k")] if args.big_vocab else [])
        print("| model | llmq | format | wall s | peak RSS MiB | RSS / this llmq's gptq run | time / this llmq's gptq run |\n"
              "|---|---|---|---|---|---|---|")
        for model in models:
            base = None
            for tree_name, tree in trees.items():
                for fmt in (["--format", "gptq"], ["--format", "gguf", "--gguf-type", args.gguf_type]):
                    gguf = fmt[1] == "gguf"
                    out = Path(tmp) / f"{model.name}-{tree_name}-{fmt[1]}{'.gguf' if gguf else ''}"
                    s = run(tree, model, out, fmt, args.dataset, args.nsamples, args.seqlen)
                    base = base or s
                    label = f"gguf {args.gguf_type}" if gguf else "gptq"
                    print(f"| {model.name} | {tree_name} | {label} | {s['seconds']:.1f} | {s['peak_rss_mib']:.0f} | "
                          f"{s['peak_rss_mib'] / base['peak_rss_mib']:.2f} | {s['seconds'] / base['seconds']:.2f} |", flush=True)
                    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
